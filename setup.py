"""distill-reader: service-based knowledge distillation for PaddlePaddle."""
from setuptools import find_packages, setup

# PaddlePaddle is left to the user, as PaddleSlim and PaddleNLP do: `paddlepaddle` and `paddlepaddle-gpu` are two
# distributions that both install the same `paddle` package, so requiring one would pull it in next to the other
# (or next to a paddle 3 the user already has) and the last one installed would overwrite the other's files.
# Pick one with an extra: `pip install -e .[cpu]` or `pip install -e .[gpu]` (see README "Installing PaddlePaddle").
PADDLE_SUPPORTED = ">=2.6.2,<4"

setup(
    name="distill-reader",
    version="0.1.0",
    description="Service-based knowledge distillation for PaddlePaddle: a data reader that asks remote teachers.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["distill_reader", "distill_reader.*", "teachers", "teachers.*",
                                    "discovery", "discovery.*"]),
    package_data={"distill_reader.proto": ["*.py"]},
    install_requires=[
        "numpy>=1.23",
        # grpcio-tools/-health-checking 1.85+ need protobuf>=7, and paddle 2.6.2's fleet breaks on protobuf 7.
        "grpcio>=1.74,<1.79",
        "grpcio-health-checking>=1.74,<1.79",
        "protobuf>=6.31,<7",
        "requests>=2.28",
        "kazoo>=2.9",
        "tqdm>=4.60",
        "aiohttp>=3.9",             # the teacher server's HTTP front
        "prometheus_client>=0.17",  # the teacher server's metrics (--enable_prometheus)
    ],
    extras_require={
        # Exactly one of these two: both distributions write the same `paddle` package.
        "cpu": [f"paddlepaddle{PADDLE_SUPPORTED}"],
        "gpu": [f"paddlepaddle-gpu{PADDLE_SUPPORTED}"],
        "examples": ["matplotlib>=3.5"],
        "test": ["pytest>=7", "pytest-timeout>=2.1", "ruff>=0.5", "matplotlib>=3.5", "cryptography>=41",
                 "hypothesis>=6.100",
                 "atheris>=2.3",            # coverage-guided fuzzing in the suite (tests/fuzz, issue 26)
                 "grpcio-tools>=1.74,<1.79"],
    },
    entry_points={
        "console_scripts": [
            "distill-teacher-serve=teachers.serve:main",
            "distill-teacher-export=teachers.export:main",
            "distill-register=discovery.register:main",
            "distill-knowledge=distill_reader.knowledge.__main__:main",
        ],
    },
)
