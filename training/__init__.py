"""Training EMO's three stages: `prepare` (videos -> clips), `data` (datasets), `train` (one trainer), `config`.

See training/README.md. This package imports `pipeline`, never `emo_app`.
"""
