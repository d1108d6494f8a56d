"""Serve a trained classifier over HTTP with LitServe: ``POST /predict``, a page at ``/``.

The API server processes check every request (:class:`RequestCheck`) before it reaches
the model: LitServe batches requests, and an error raised while decoding one request of
a batch would fail every request in it. The model worker then only sees well-formed
lists of texts, batches them across requests and answers each request in its order.
"""

# No ``from __future__ import annotations``: LitServe hands the methods' annotations to
# FastAPI as the endpoint's request and response types, which must be real types.

import json
import logging
import multiprocessing
import os
import signal
from collections.abc import Sequence
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import litserve as ls
import torch
from starlette.responses import HTMLResponse, JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gpt_classifier.inference.classifier import Prediction, TextClassifier
from gpt_classifier.inference.server_processes import exit_with_parent

log = logging.getLogger(__name__)

PREDICT_PATH = "/predict"


class BadRequest(ValueError):
    """What is wrong with a request, and the HTTP status that says so."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_request(body: bytes, max_texts: int) -> tuple[bool, list[str]]:
    """``{"text": "..."}`` or ``{"texts": [...]}`` to (single, texts), else BadRequest."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadRequest(400, f'the body is not JSON ({err}); send {{"text": "..."}}') from err
    except RecursionError as err:  # e.g. 60 KB of [[[...]]], under the size limit
        raise BadRequest(400, 'the JSON body is nested too deeply; send {"text": "..."}') from err
    if not isinstance(payload, dict):
        raise BadRequest(422, 'the JSON body must be an object: {"text": "..."} or '
                              '{"texts": ["...", ...]}')  # fmt: skip
    given = [key for key in ("text", "texts") if key in payload]
    if len(given) != 1:
        what = "both" if given else "neither"
        raise BadRequest(422, f'give exactly one of "text" (a string) or "texts" (a list of '
                              f'strings); this request has {what}')  # fmt: skip
    unknown = sorted(set(payload) - {"text", "texts"})
    if unknown:
        raise BadRequest(422, f"unknown field(s) {unknown}; the fields are 'text' or 'texts'")
    if "text" in payload:
        texts, single = [payload["text"]], True
        names = ['"text"']
    else:
        texts, single = payload["texts"], False
        if not isinstance(texts, list):
            raise BadRequest(422, f'"texts" must be a list of strings, not {type(texts).__name__}')
        if not texts:
            raise BadRequest(422, '"texts" is an empty list; give at least one text')
        if len(texts) > max_texts:
            raise BadRequest(413, f'"texts" has {len(texts)} texts; a request may hold at most '
                                  f"{max_texts} (split it, or raise max_texts)")  # fmt: skip
        names = [f'"texts"[{i}]' for i in range(len(texts))]
    for name, text in zip(names, texts):
        if not isinstance(text, str):
            raise BadRequest(422, f"{name} must be a string, not {type(text).__name__}")
        if not text.strip():
            raise BadRequest(422, f"{name} is empty; every text needs some characters")
    return single, texts


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The request body, or None once it grows past ``limit`` bytes."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if len(body) > limit:
            return None
        if not message.get("more_body", False):
            return body


class RequestCheck:
    """ASGI middleware: answers a malformed or oversized ``POST /predict`` with a 4xx and a
    JSON ``{"detail": ...}`` saying what was wrong, so the model only sees good requests."""

    def __init__(self, app: ASGIApp, *, max_request_bytes: int, max_texts: int) -> None:
        self.app = app
        self.max_request_bytes = max_request_bytes
        self.max_texts = max_texts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PREDICT_PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive, self.max_request_bytes)
        try:
            if body is None:
                raise BadRequest(413, f"the request is over {self.max_request_bytes} bytes; send "
                                      "fewer or shorter texts")  # fmt: skip
            parse_request(body, self.max_texts)
        except BadRequest as bad:
            await JSONResponse({"detail": str(bad)}, status_code=bad.status)(scope, receive, send)
            return
        # The body is JSON whatever the client declared (``curl -d`` says form data).
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
        scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


class Page:
    """ASGI middleware: ``GET /`` is the page to try the classifier (LitServe's own index
    route only says that it runs)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.html = resources.files("gpt_classifier.inference").joinpath("page.html").read_text()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/" and scope["method"] in ("GET", "HEAD"):
            await HTMLResponse(self.html)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def prediction_json(prediction: Prediction) -> dict[str, Any]:
    return {"label": prediction.label, "probabilities": prediction.probabilities,
            "truncated": prediction.truncated}  # fmt: skip


class ClassifierAPI(ls.LitAPI):
    """One model worker: loads the classifier once, classifies the texts of a batch of
    requests in one call, and answers each request with its own predictions."""

    def __init__(self, path: str, batch_size: int = 32, workers: int = 1, **kwargs: Any) -> None:
        super().__init__(api_path=PREDICT_PATH, **kwargs)
        self.path = path
        self.batch_size = batch_size
        self.workers = workers

    def setup(self, device: str) -> None:
        if multiprocessing.parent_process() is not None:  # a LitServe worker process
            exit_with_parent()
            # The main process stops the workers once the requests in flight are answered;
            # a Ctrl-C in the terminal reaches every process of the group at once.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        if device.startswith("cpu") and self.workers > 1:
            # Workers share the cores: each with a thread per core would oversubscribe them.
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
            torch.set_num_threads(max(1, (cores or os.cpu_count() or 1) // self.workers))
        self.classifier = TextClassifier.load(self.path, device=device)
        log.info("Loaded %s on %s (%d threads)", self.path, device, torch.get_num_threads())

    def decode_request(self, request):  # LitServe passes the parsed JSON: no annotation
        """(single, texts) of one request."""
        # RequestCheck has checked the body; this only shapes it.
        if "text" in request:
            return True, [request["text"]]
        return False, list(request["texts"])

    def batch(self, inputs: Sequence[tuple[bool, list[str]]]) -> list[tuple[bool, list[str]]]:
        return list(inputs)

    def predict(self, requests: list[tuple[bool, list[str]]]) -> list[dict[str, Any]]:
        if isinstance(requests, tuple):  # max_batch_size=1: LitServe skips batch/unbatch
            return self.predict([requests])[0]
        texts = [text for _, group in requests for text in group]
        predictions = iter(self.classifier.classify(texts, batch_size=self.batch_size))
        answers = []
        for single, group in requests:
            mine = [prediction_json(next(predictions)) for _ in group]
            answers.append(mine[0] if single else {"predictions": mine})
        return answers

    def unbatch(self, output: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return output

    def encode_response(self, output: dict[str, Any]) -> dict[str, Any]:
        return output


def _version() -> str:
    try:
        return metadata.version("gpt-classifier")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


def model_info(classifier: TextClassifier, path: Path) -> dict[str, Any]:
    """What ``GET /info`` says about the model."""
    cfg = classifier.model.cfg
    settings = classifier.settings
    return {
        "path": str(path),
        "labels": list(settings.label_names),
        "max_length": min(settings.max_length, cfg.context_length),
        "pooling": settings.pooling,
        "truncation_side": settings.truncation_side,
        "n_layer": cfg.n_layers,
        "n_embd": cfg.emb_dim,
        "parameters": classifier.num_parameters(),
        "runtime": "onnxruntime" if not isinstance(classifier.model, torch.nn.Module) else "torch",
        "version": _version(),
    }
