"""flexkd: a benchmark harness for knowledge distillation of language models."""

from flexkd import resolvers  # noqa: F401  (config resolvers used by conf/)
