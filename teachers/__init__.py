"""Teacher side: export Paddle models as Paddle Serving model folders (``teachers.export``) and serve them
as Paddle Serving-compatible endpoints on Paddle Inference (``python -m teachers.serve``)."""
