"""The pre-flight: every missing piece of a task, found at once before any work, with fixes."""

from __future__ import annotations

import difflib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from gpt_classifier.data.sms import FILE_NAME
from gpt_classifier.data.tokenizer import BPE_URL
from gpt_classifier.extras import ExtraError, import_extra
from gpt_classifier.inference.classifier import unusable
from gpt_classifier.model.weights import HUB_MODELS, HUB_PREFIX
from gpt_classifier.tasks.errors import ConfigError, ShownAsMessage
from gpt_classifier.tasks.reachability import (
    hub_cached,
    hub_dataset_cached,
    hub_offline,
    probe,
    reachable,
    tiktoken_cached,
)
from gpt_classifier.tasks.run_folder import in_multirun, remove_unused_run_folder, sweep_started

log = logging.getLogger(__name__)

EXIT_STATUS = 2
_SHORT_NAMES = [name for name in HUB_MODELS if "/" not in name]
SMOKE_RUN = "model.pretrained=false (random weights: a smoke run, not a classifier)"


@dataclass(frozen=True)
class Missing:
    """One piece a task cannot start without, and what the user can do about it."""

    what: str
    fixes: tuple[str, ...]


def check_training(cfg: DictConfig) -> None:
    """``train.py``'s pre-flight, before Lightning's import (a resume's config is the run's)."""
    honour_weights(cfg)
    output_dir = Path(cfg.paths.output_dir)
    unread = _unread_keys(cfg)
    last = str(cfg.get("ckpt_path")) == "last" and not _checkpoints(output_dir)
    if last and in_multirun() and sweep_started(output_dir):
        with open_dict(cfg):  # a sweep resumed: its jobs that saved nothing start
            cfg.ckpt_path = None
    if cfg.get("ckpt_path"):
        if last:
            unread.append(_no_run_to_resume(output_dir))
        if unread:
            _stop(unread, output_dir)
        return
    probe([BPE_URL, "https://huggingface.co", *(cfg.data.get("urls") or [])])
    missing = [
        *unread,
        *_old_keys(cfg),
        *_device(cfg.trainer),
        *_weights(cfg.model),
        *_tokenizer(cfg.model.weights if cfg.model.pretrained else None),
        *_data_files(cfg.data),
        *_hub_dataset(cfg.data),
        *_sms_data(cfg.data),
    ]
    if missing:
        _stop(missing, output_dir)


def honour_weights(cfg: DictConfig) -> None:
    """``model.weights`` given on the command line is loaded, even with gpt2-tiny's preset."""
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
    probe([BPE_URL])
    missing = [*_unread_keys(cfg), *_tokenizer(None)]
    fixes = ["ckpt_path=<a run folder (outputs/train/runs/...), one of its .ckpt files, or an "
             "export folder>"]  # fmt: skip
    if OmegaConf.is_missing(cfg, "ckpt_path"):
        if latest := _latest_run(Path(cfg.paths.root_dir) / "outputs" / "train" / "runs"):
            fixes.insert(0, f"ckpt_path={latest} (the latest training run here)")
        missing.insert(0, Missing("ckpt_path is not given: which trained model to use", (*fixes,)))
    elif not Path(str(cfg.ckpt_path)).expanduser().exists():
        missing.insert(0, Missing(f"ckpt_path={cfg.ckpt_path} does not exist", (*fixes,)))
    if missing:
        _stop(missing, Path(cfg.paths.output_dir))


def _unread_keys(cfg: DictConfig) -> list[Missing]:
    """Keys that ``+key=value`` overrides brought in and nothing reads (a typo); what a built
    object (a node with ``_target_``) or the Trainer is given, its constructor checks."""
    hydra = HydraConfig.get() if HydraConfig.initialized() else None
    overrides, groups = (hydra.overrides.task, hydra.runtime.choices) if hydra else ([], {})
    added = {o[1:].split("=", 1)[0]: o[1:] for o in overrides if o[:1] == "+" != o[1:2]}
    new: dict[str, list[str]] = {}  # the first key of each path that only overrides made
    for key, given in added.items():
        parts = key.split(".")
        nodes = [OmegaConf.select(cfg, ".".join(parts[:i])) for i in range(1, len(parts) + 1)]
        built = any(isinstance(node, DictConfig) and "_target_" in node for node in nodes)
        if built or key in groups or "/" in key or parts[0] in ("trainer", "accelerator", "hydra"):
            continue  # (accelerator: _old_keys names its new keys)
        for i, node in enumerate(nodes, 1):
            plain = OmegaConf.to_container(node) if isinstance(node, DictConfig) else node
            if _paths(plain, ".".join(parts[:i])) <= set(added):
                new.setdefault(".".join(parts[:i]), []).append(given)
                break
    unread = []
    for path, given in new.items():
        parent, _, name = path.rpartition(".")
        close = difflib.get_close_matches(name, [k for k in OmegaConf.select(cfg, parent) or cfg
                                                 if k != name], n=1)  # fmt: skip
        fixed = f"{parent}.{close[0]}".lstrip(".") if close else ""
        fix = (f"{given[0].replace(path, fixed, 1)} (did you mean {fixed}?)" if close
               else "drop it (`--cfg job` prints the keys there are)")  # fmt: skip
        unread.append(Missing(f"+{', +'.join(given)}: nothing reads {path}", (fix,)))
    return unread


def _paths(node: object, prefix: str) -> set[str]:
    if not isinstance(node, dict) or not node:
        return {prefix}
    return {path for k, v in node.items() for path in _paths(v, f"{prefix}.{k}")}


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
    if hub_cached(repo) or reachable("https://huggingface.co"):
        return []
    return [Missing(
        f"GPT-2 weights {repo!r} (model.weights={source}): not in the Hugging Face cache "
        f"and the Hub cannot be reached{' (HF_HUB_OFFLINE=1)' if hub_offline() else ''}",
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
    if tiktoken_cached() or reachable(BPE_URL):
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
    """Given data files that do not exist, a dataset not named, 🤗 datasets not installed."""
    given = {"data.path": data.get("path")}
    given |= {f"data.files.{split}": file for split, file in (data.get("files") or {}).items()}
    missing = []
    if "files" in data and given["data.path"] is None and given["data.files.train"] is None:
        missing.append(Missing("data=files names no file", ("data.path=<one file, to split>",
                               "data.files.train=<file> (and .validation=, .test=)")))  # fmt: skip
    if OmegaConf.is_missing(data, "name"):
        missing.append(Missing("data=hf names no dataset", ("data.name=<a 🤗 Hub id (owner/name), "
                               "or a folder written by save_to_disk>",)))  # fmt: skip
    if "files" in data or "name" in data:
        try:  # imported now, not after the Trainer: the run reads its data with it
            import_extra("datasets", "data", "data=files" if "files" in data else "data=hf")
        except ExtraError as err:
            missing.append(Missing(err.what, (err.fix,)))
    for key, file in given.items():
        if file is None or (path := Path(str(file)).expanduser()).exists():
            continue
        where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
        missing.append(Missing(f"{key}={file} does not exist{where}",
                               (f"{key}=<the path of an existing file>",)))  # fmt: skip
    return missing


def _checkpoints(run: Path) -> list[Path]:
    return list((run / "checkpoints").glob("*.ckpt"))


def _latest_run(folder: Path) -> Path | None:
    """The run in ``folder`` that saved a checkpoint last (relative to here, if within)."""
    runs = [run for run in folder.iterdir() if run.is_dir() and _checkpoints(run)] if (
        folder.is_dir()) else []  # fmt: skip
    if not runs:
        return None
    latest = max(runs, key=lambda run: max(p.stat().st_mtime for p in _checkpoints(run)))
    return latest.relative_to(Path.cwd()) if latest.is_relative_to(Path.cwd()) else latest


def _no_run_to_resume(output_dir: Path) -> Missing:
    """``ckpt_path=last`` where no checkpoint is: the fix names the latest run with some."""
    run = "sweep" if in_multirun() else "run"  # a sweep's: a new folder, where no job ran
    fixes = [f"hydra.{run}.dir=<the folder of the {run} to resume>"]
    if run == "run" and (latest := _latest_run(output_dir.parent)):
        fixes.insert(0, f"hydra.run.dir={latest} (the latest run there with checkpoints)")
    return Missing(f"ckpt_path=last resumes the run in hydra.run.dir, but {output_dir} holds "
                   "no checkpoint", tuple(fixes))  # fmt: skip


def _hub_dataset(data: DictConfig) -> list[Missing]:
    """A 🤗 Hub dataset neither cached nor downloadable (a missing folder: _data_files)."""
    name = None if OmegaConf.is_missing(data, "name") else data.get("name")
    if name is None or Path(str(name)).expanduser().exists() or hub_dataset_cached(str(name)):
        return []
    if reachable("https://huggingface.co"):
        return []
    where = f"the Hub cannot be reached{' (HF_HUB_OFFLINE=1)' if hub_offline() else ''}"
    return [Missing(f"the 🤗 dataset data.name={name}: not in the datasets cache and {where}",
                    ("run once online: the download is cached under HF_HOME",
                     "data.name=<a folder written by save_to_disk>"))]  # fmt: skip


def _sms_data(data: DictConfig) -> list[Missing]:
    if data.get("path") is not None or "urls" not in data:
        return []  # a given file: _data_files checks it is there, the data module the rest
    target = Path(data.data_dir) / FILE_NAME
    if target.is_file() or any(reachable(url) for url in data.urls):
        return []
    return [Missing(
        f"the SMS Spam Collection: not at {target}, and none of its download hosts "
        f"({', '.join(sorted({urlparse(u).hostname or u for u in data.urls}))}) can be reached",
        (f"data.path=/path/to/{FILE_NAME} (or the UCI zip)", f"put the file at {target}"),
    )]  # fmt: skip


def _stop(missing: list[Missing], output_dir: Path) -> None:
    lines = [f"Cannot start: {len(missing)} thing(s) missing. Nothing was run."]
    for number, item in enumerate(missing, 1):
        lines.append(f"  {number}. {item.what}")
        lines.extend(f"     fix: {fix}" for fix in item.fixes)
    message = "\n".join(lines)
    if in_multirun():
        # A failed job, as Hydra records it: the sweep's other jobs still run, and its
        # summary lists this one (its folder kept, with the overrides in .hydra/).
        raise ShownAsMessage(message)
    remove_unused_run_folder(output_dir)
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise RuntimeError(message)
    print(message, file=sys.stderr)
    raise SystemExit(EXIT_STATUS)
