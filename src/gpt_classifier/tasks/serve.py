"""The task behind ``python serve.py``: a LitServe server for one trained classifier."""

from __future__ import annotations

import logging
import socket
from functools import partial
from pathlib import Path

from omegaconf import DictConfig

from gpt_classifier.extras import import_extra
from gpt_classifier.inference import TextClassifier
from gpt_classifier.inference.classifier import resolve_device
from gpt_classifier.tasks.errors import ConfigError
from gpt_classifier.tasks.preflight import check_inference

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda", "mps")


def build_server(cfg: DictConfig):
    """The LitServer for ``cfg``; the model is loaded here once, so that a bad
    ``ckpt_path`` fails now with its own message instead of inside a worker process."""
    from gpt_classifier.inference.server import ClassifierAPI, Page, RequestCheck, model_info
    from gpt_classifier.inference.server_processes import ClassifierServer

    if cfg.device not in DEVICES:
        raise ValueError(f"device={cfg.device!r} is not one of {list(DEVICES)}")
    resolve_device(cfg.device)  # here, not in a worker that cannot start
    at_least_one = ("max_batch_size", "batch_size", "workers", "max_request_bytes", "max_texts")
    for key in (*at_least_one, "header_timeout"):
        if float(cfg[key]) < 1:
            raise ValueError(f"{key}={cfg[key]} must be at least 1")
    path = Path(cfg.ckpt_path).expanduser()
    info = model_info(TextClassifier.load(path, device="cpu"), path)
    # An ONNX export runs on the CPU: auto must not hand its workers a GPU.
    onnx = info["runtime"] == "onnxruntime"
    device = "cpu" if onnx and cfg.device == "auto" else cfg.device
    api = ClassifierAPI(str(path), batch_size=int(cfg.batch_size), workers=int(cfg.workers),
                        max_batch_size=int(cfg.max_batch_size),
                        batch_timeout=float(cfg.batch_timeout))  # fmt: skip
    return ClassifierServer(
        api,
        accelerator=device,
        workers_per_device=int(cfg.workers),
        timeout=float(cfg.timeout),
        model_metadata=info,
        middlewares=[
            (
                RequestCheck,
                {"max_request_bytes": int(cfg.max_request_bytes), "max_texts": int(cfg.max_texts)},
            ),
            Page,
        ],  # fmt: skip
    )


def serve(cfg: DictConfig) -> None:
    """Run the server until SIGTERM or Ctrl-C, then stop all of its processes."""
    import_extra("litserve", "serve", "serve.py")
    from gpt_classifier.inference.server_processes import HeaderTimeoutProtocol, stop_together

    check_inference(cfg)
    check_port(str(cfg.host), int(cfg.port))
    server = build_server(cfg)
    log.info("Serving %s on http://%s:%d/ (POST /predict, GET /health, GET /info)",
             cfg.ckpt_path, cfg.host, cfg.port)  # fmt: skip
    stop_together()
    http = partial(HeaderTimeoutProtocol, header_timeout=float(cfg.header_timeout))
    server.run(host=cfg.host, port=int(cfg.port), log_level=cfg.log_level, http=http,
               generate_client_file=False, num_api_servers=1)  # fmt: skip
    if server.worker_failed:
        raise RuntimeError("the model worker failed to load the model (its error is above)")


def check_port(host: str, port: int) -> None:
    """Fail before the model loads when ``host:port`` cannot be listened on (uvicorn would
    say only "Address already in use", after the model loaded)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        socket.create_server((host, port), family=family).close()
    except OSError as err:
        raise ConfigError(
            f"host={host} port={port} cannot be served on ({err.strerror or err}): another "
            f"process may listen there (a serve.py still running?); stop it, or choose "
            f"another port, e.g. port={port + 1}"
        ) from err
