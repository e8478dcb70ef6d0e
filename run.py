"""Hydra entry point. All logic lives in flexkd.pipeline; this file only wires Hydra to it."""

import hydra
from omegaconf import DictConfig

from flexkd.cli import guarded


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from flexkd.pipeline import main_metric, run

    return guarded(cfg, lambda: main_metric(run(cfg)))


if __name__ == "__main__":
    main()
