"""distill_base: the ground that both sides of the Paddle Serving wire stand on.

The student (``distill_reader``), the teacher server (``teachers``) and discovery (``discovery``) import this
package; it imports none of them. It holds what a request and its answer are made of and how both ends read
them: the protos (``proto``), the model's serving config (``serving_config``), the tensor codec
(``tensor_codec``), the ``err_no`` table with each code's class (``status_codes``), the JSON form of a message
(``serving_json``), endpoints (``endpoints``), what a client presents to a teacher (``client_security``), and the
small tools both sides use: ``backoff``, ``atomic_file``, ``cli_help``, ``paddle_compat``.

Package arrows (checked by tests/test_layering.py)::

    distill_base  <-  discovery  <-  teachers
                  <-             <-  distill_reader
"""
