"""The pre-flight: every missing piece a task needs (a device, weights, tokenizer files,
data), found at once before any work, each with its fix."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from gpt_classifier.data.sms import FILE_NAME
from gpt_classifier.data.tokenizer import BPE_URL
from gpt_classifier.inference.classifier import unusable
from gpt_classifier.model.weights import HUB_MODELS, HUB_PREFIX
from gpt_classifier.tasks.errors import ConfigError, ShownAsMessage

log = logging.getLogger(__name__)

EXIT_STATUS = 2
# One connection attempt per host, all at once: offline, the answer comes in this long.
REACH_TIMEOUT_S = 2.0
_SHORT_NAMES = [name for name in HUB_MODELS if "/" not in name]
SMOKE_RUN = "model.pretrained=false (random weights: a smoke run, not a classifier)"


@dataclass(frozen=True)
class Missing:
    """One piece a task cannot start without, and what the user can do about it."""

    what: str
    fixes: tuple[str, ...]


def check_training(cfg: DictConfig) -> None:
    """``train.py``'s pre-flight, before Lightning's import (a resume takes the run's own
    config, checked as it loads)."""
    honour_weights(cfg)
    output_dir = Path(cfg.paths.output_dir)
    if cfg.get("ckpt_path"):
        if str(cfg.ckpt_path) == "last" and not _checkpoints(output_dir):
            _stop([_no_run_to_resume(output_dir)], output_dir)
        return
    _probe([BPE_URL, "https://huggingface.co", *(cfg.data.get("urls") or [])])
    missing = [
        *_old_keys(cfg),
        *_device(cfg.trainer),
        *_weights(cfg.model),
        *_tokenizer(cfg.model.weights if cfg.model.pretrained else None),
        *_data_files(cfg.data),
        *_sms_data(cfg.data),
    ]
    if missing:
        _stop(missing, output_dir)


def honour_weights(cfg: DictConfig) -> None:
    """``model.weights`` given on the command line is loaded, even with a preset that trains
    from random weights (gpt2-tiny), unless ``model.pretrained=false`` contradicts it."""
    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    given = {override.split("=", 1)[0].lstrip("+~") for override in overrides}
    if cfg.model.pretrained or "model.weights" not in given or not cfg.model.weights:
        return
    if "model.pretrained" in given:
        raise ConfigError(
            f"model.weights={cfg.model.weights} and model.pretrained=false contradict each "
            "other: drop model.pretrained=false to train from those weights, or drop "
            "model.weights to train from random ones"
        )
    with open_dict(cfg):
        cfg.model.pretrained = True
    log.info("model.weights=%s given: training from those weights (model=%s alone would "
             "start from random ones)", cfg.model.weights, cfg.model.name)  # fmt: skip


def check_inference(cfg: DictConfig) -> None:
    """The pre-flight of predict, eval, export and serve: the model's path, the tokenizer."""
    _probe([BPE_URL])
    missing = _tokenizer(None)
    path = Path(str(cfg.ckpt_path)).expanduser()
    if not path.exists():
        missing.insert(0, Missing(
            f"ckpt_path={cfg.ckpt_path} does not exist",
            ("ckpt_path=<a run folder (outputs/train/runs/...), one of its .ckpt files, or an "
             "export folder>",),
        ))  # fmt: skip
    if missing:
        _stop(missing, Path(cfg.paths.output_dir))


# ----------------------------------------------------------------------------- the checks


def _old_keys(cfg: DictConfig) -> list[Missing]:
    moved = "accelerator.* keys: the accelerator group sets trainer.accelerator, trainer.precision"
    fix = "write trainer.precision=... and trainer.accelerator=... instead of accelerator.*"
    return [Missing(moved, (fix,))] if "accelerator" in cfg else []


def _device(trainer: DictConfig) -> list[Missing]:
    """The GPU that ``accelerator=cuda`` or ``mps`` asks for, where torch sees none."""
    kind = str(trainer.get("accelerator"))
    if kind not in ("gpu", "cuda", "mps"):
        return []
    why = unusable(torch.device("mps" if kind == "mps" else "cuda"))
    if why is None or (kind == "gpu" and unusable(torch.device("mps")) is None):
        return []  # Lightning's "gpu" is CUDA's, else Apple's MPS
    fixes = ["accelerator=auto (a GPU where there is one, else the CPU), or accelerator=cpu"]
    if kind != "mps" and torch.version.cuda is None:
        fixes.append("install a CUDA build of torch: https://pytorch.org/get-started/locally/")
    return [Missing(f"trainer.accelerator={kind}: {why}", tuple(fixes))]


def _weights(model: DictConfig) -> list[Missing]:
    if not model.pretrained:
        return []
    source = str(model.weights)
    if Path(source).expanduser().exists():
        return []  # the loader checks what is in it, with its own messages
    repo = source[len(HUB_PREFIX) :] if source.startswith(HUB_PREFIX) else HUB_MODELS.get(source)
    if repo is None:
        return [Missing(
            f"model.weights={source} is neither an existing path nor a known GPT-2 name",
            (f"model.weights=<a Hub name: {', '.join(sorted(_SHORT_NAMES))}, "
             "hf:<owner>/<repo>, or a folder>", SMOKE_RUN),
        )]  # fmt: skip
    if _hub_cached(repo) or _reachable("https://huggingface.co"):
        return []
    return [Missing(
        f"GPT-2 weights {repo!r} (model.weights={source}): not in the Hugging Face cache "
        f"and the Hub cannot be reached{' (HF_HUB_OFFLINE=1)' if _hub_offline() else ''}",
        ("model.weights=/path/to/folder (a save_pretrained folder with model.safetensors and "
         "config.json, or OpenAI's checkpoint folder)", "run once with network access: the "
         "download is cached under HF_HOME", SMOKE_RUN),
    )]  # fmt: skip


def _tokenizer(folder: str | None) -> list[Missing]:
    if folder is not None:
        path = Path(folder).expanduser()
        path = path if path.is_dir() else path.parent
        if (path / "encoder.json").is_file() and (path / "vocab.bpe").is_file():
            return []
    if _tiktoken_cached() or _reachable(BPE_URL):
        return []
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    where = f"TIKTOKEN_CACHE_DIR={cache}" if cache else "tiktoken's cache"
    return [Missing(
        f"GPT-2's tokenizer files (tiktoken's gpt2 encoding): not in {where} and "
        f"{urlparse(BPE_URL).hostname} cannot be reached",
        ("TIKTOKEN_CACHE_DIR=/path/to/a/tiktoken/cache (copied from a machine where "
         "tiktoken.get_encoding('gpt2') ran once)", "model.weights=<OpenAI's checkpoint folder, "
         "which has encoder.json and vocab.bpe>"),
    )]  # fmt: skip


def _data_files(data: DictConfig) -> list[Missing]:
    """The data files given by path (``data.path``, ``data.files.*``) that do not exist."""
    given = {"data.path": data.get("path")}
    given |= {f"data.files.{split}": file for split, file in (data.get("files") or {}).items()}
    missing = []
    if "files" in data and given["data.path"] is None and given["data.files.train"] is None:
        missing.append(Missing("data=files names no file", ("data.path=<one file, to split>",
                               "data.files.train=<file> (and .validation=, .test=)")))  # fmt: skip
    for key, file in given.items():
        if file is None or (path := Path(str(file)).expanduser()).exists():
            continue
        where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
        missing.append(Missing(f"{key}={file} does not exist{where}",
                               (f"{key}=<the path of an existing file>",)))  # fmt: skip
    return missing


def _checkpoints(run: Path) -> list[Path]:
    return list((run / "checkpoints").glob("*.ckpt"))


def _no_run_to_resume(output_dir: Path) -> Missing:
    """``ckpt_path=last`` where no checkpoint is: the fix names the latest run with some."""
    runs = [run for run in output_dir.parent.iterdir() if run.is_dir() and _checkpoints(run)]
    fixes = ["hydra.run.dir=<the folder of the run to resume>"]
    if runs:
        latest = max(runs, key=lambda run: max(p.stat().st_mtime for p in _checkpoints(run)))
        shown = latest.relative_to(Path.cwd()) if latest.is_relative_to(Path.cwd()) else latest
        fixes.insert(0, f"hydra.run.dir={shown} (the latest run there with checkpoints)")
    return Missing(f"ckpt_path=last resumes the run in hydra.run.dir, but {output_dir} holds "
                   "no checkpoint", tuple(fixes))  # fmt: skip


def _sms_data(data: DictConfig) -> list[Missing]:
    if data.get("path") is not None or "urls" not in data:
        return []  # a given file: _data_files checks it is there, the data module the rest
    target = Path(data.data_dir) / FILE_NAME
    if target.is_file() or any(_reachable(url) for url in data.urls):
        return []
    return [Missing(
        f"the SMS Spam Collection: not at {target}, and none of its download hosts "
        f"({', '.join(sorted({urlparse(u).hostname or u for u in data.urls}))}) can be reached",
        (f"data.path=/path/to/{FILE_NAME} (or the UCI zip)",
         f"put the file at {target}"),
    )]  # fmt: skip


# ----------------------------------------------------------------------------- caches, network


def _hub_cached(repo: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    has = {name for name in ("config.json", "model.safetensors", "pytorch_model.bin")
           if isinstance(try_to_load_from_cache(repo, name), str)}  # fmt: skip
    return "config.json" in has and len(has) > 1


def _tiktoken_cached() -> bool:
    # tiktoken keeps each downloaded file under the SHA-1 of its URL (tiktoken.load).
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    folder = Path(cache) if cache else Path(tempfile.gettempdir()) / "data-gym-cache"
    files = ("vocab.bpe", "encoder.json")
    return all((folder / hashlib.sha1((BPE_URL + f).encode()).hexdigest()).is_file() for f in files)


_REACHED: dict[str, bool] = {}


def _probe(urls: list[str]) -> None:
    """Try every host at once, each once, so that offline the pre-flight takes seconds."""
    hosts = {urlparse(url).hostname or "" for url in urls} - set(_REACHED)
    if _hub_offline():
        _REACHED["huggingface.co"] = False
        hosts.discard("huggingface.co")

    def connects(host: str) -> bool:
        try:
            with socket.create_connection((host, 443), timeout=REACH_TIMEOUT_S):
                return True
        except OSError:
            return False

    pool = ThreadPoolExecutor(max(1, len(hosts)))
    futures = {host: pool.submit(connects, host) for host in hosts}
    for host, future in futures.items():
        try:  # getaddrinfo has no timeout of its own: bound the whole attempt
            _REACHED[host] = future.result(timeout=REACH_TIMEOUT_S + 0.5)
        except TimeoutError:
            _REACHED[host] = False
    pool.shutdown(wait=False)


def _reachable(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host not in _REACHED:
        _probe([url])
    return _REACHED[host]


def _hub_offline() -> bool:
    from huggingface_hub import constants  # HF_HUB_OFFLINE read as the Hub's client reads it

    return constants.HF_HUB_OFFLINE


# ----------------------------------------------------------------------------- the report


def _stop(missing: list[Missing], output_dir: Path) -> None:
    lines = [f"Cannot start: {len(missing)} thing(s) missing. Nothing was run."]
    for number, item in enumerate(missing, 1):
        lines.append(f"  {number}. {item.what}")
        lines.extend(f"     fix: {fix}" for fix in item.fixes)
    message = "\n".join(lines)
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        # A failed job, as Hydra records it: the sweep's other jobs still run, and its
        # summary lists this one (its folder kept, with the overrides in .hydra/).
        raise ShownAsMessage(message)
    _remove_empty_run_folder(output_dir)
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise RuntimeError(message)
    print(message, file=sys.stderr)
    raise SystemExit(EXIT_STATUS)


def _remove_empty_run_folder(output_dir: Path) -> None:
    """The run folder Hydra made, when it holds only Hydra's files (its log, ``.hydra/``)."""
    if not output_dir.is_dir():
        return
    hydras = {".hydra"} | {p.name for p in output_dir.glob("*.log")}
    if {p.name for p in output_dir.iterdir()} <= hydras:
        shutil.rmtree(output_dir, ignore_errors=True)
