"""Hydra entry point. All logic lives in flexkd; this file only wires Hydra to it."""

import hydra
from omegaconf import DictConfig

import flexkd.cli  # noqa: F401  (offline defaults, config resolvers)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from flexkd.jobs import run_job

    return run_job(cfg)


if __name__ == "__main__":
    main()
