"""Load-test a running ``serve.py`` on this machine and print a table.

    python serve.py ckpt_path=<run> &              # in another shell
    python scripts/load_test.py --url http://127.0.0.1:8000 --concurrency 1,8,32 --requests 64 \\
        --data ../shared/data/sms_spam_collection/SMSSpamCollection --gflops 55 --ckpt <run>

Each concurrency level sends ``--requests`` single-message requests (or stops after
``--max-seconds``) from that many client threads and reports requests/s, messages/s and
latency percentiles. With ``--gflops`` (this CPU's float32 matmul rate, from
``python scripts/precision_check.py``) it also reports the fraction of the arithmetic
limit reached: a message costs about 24·d²·layers FLOPs per token (the weight products;
attention over ~30 tokens adds little). With ``--ckpt`` (the served model) it times bare
``TextClassifier.classify`` calls on one message, in this process, over the texts that
concurrency 1 sent, for comparison with the server's latency there. Only loopback
addresses are accepted: this is a tool for your own machine, not for someone else's server.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import statistics
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

EXAMPLES = [
    "WINNER!! As a valued customer you have been selected to receive a £900 prize reward.",
    "Are we still on for dinner tonight? I can pick you up at 7.",
    "URGENT! Your mobile number has won a 2000 bonus caller prize. Text CLAIM to 81010 now.",
    "Sorry, I'll call you later, in a meeting right now.",
]


def check_loopback(url: str) -> str:
    host = urlparse(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"--url {url}: only loopback addresses (127.0.0.1, ::1, localhost)")
    return url.rstrip("/")


def read_texts(path: Path | None) -> list[str]:
    """Messages of an SMS-format file (label<TAB>text), or of a file of one text per line."""
    if path is None:
        return EXAMPLES
    lines = [line for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    texts = [line.split("\t", 1)[1] if "\t" in line else line for line in lines]
    if not texts:
        raise SystemExit(f"--data {path}: no texts")
    return texts


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def post(url: str, text: str, timeout: float) -> tuple[float, bool]:
    """(seconds, ok) of one ``POST /predict``."""
    body = json.dumps({"text": text}).encode()
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            ok = response.status == 200 and "label" in json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError):
        ok = False
    return time.perf_counter() - start, ok


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def run_level(url: str, texts: list[str], concurrency: int, requests: int,
              max_seconds: float) -> dict:  # fmt: skip
    """Send ``requests`` requests from ``concurrency`` threads; stop issuing at the deadline."""
    deadline = time.monotonic() + max_seconds
    results: list[tuple[float, bool, int]] = []

    def client(worker: int) -> None:
        for i in range(worker, requests, concurrency):
            if time.monotonic() > deadline:
                return
            seconds, ok = post(url, texts[i % len(texts)], timeout=max(30.0, max_seconds))
            results.append((seconds, ok, i))

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    wall = time.perf_counter() - start
    latencies = [s for s, ok, _ in results if ok]
    return {"concurrency": concurrency, "sent": len(results),
            "errors": sum(not ok for _, ok, _ in results), "wall": wall,
            "latencies": latencies, "indices": [i for _, ok, i in results if ok]}  # fmt: skip


def bare_classify_seconds(ckpt: str, texts: list[str], count: int, max_seconds: float) -> float:
    """Median seconds of one ``TextClassifier.classify([text])`` call in this process, over
    the texts that concurrency 1 sent (the first ``count``), or as many as fit the time."""
    from gpt_classifier.inference import TextClassifier

    classifier = TextClassifier.load(ckpt, device="cpu")
    classifier.classify(texts[:1])  # warm-up
    times, deadline = [], time.monotonic() + max_seconds
    for i in range(count):
        if time.monotonic() > deadline:
            break
        start = time.perf_counter()
        classifier.classify([texts[i % len(texts)]])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated levels")
    parser.add_argument("--requests", type=int, default=64, help="requests per level")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="per level")
    parser.add_argument("--data", type=Path, help="SMS-format file or one text per line")
    parser.add_argument("--gflops", type=float, help="this CPU's float32 GFLOP/s")
    parser.add_argument("--ckpt", help="the served model, to time bare classify calls")
    args = parser.parse_args()
    url = check_loopback(args.url)
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.requests < 1 or any(c < 1 for c in levels):
        raise SystemExit("--requests and every --concurrency level must be at least 1")
    texts = read_texts(args.data)

    info = get_json(f"{url}/info")["model"]
    import tiktoken

    encoding = tiktoken.get_encoding("gpt2")
    tokens = [min(len(encoding.encode_ordinary(t)), info["max_length"]) for t in texts]
    flops_per_token = 24 * info["n_embd"] ** 2 * info["n_layer"]
    post(f"{url}/predict", texts[0], timeout=60)  # warm-up

    print(f"server: {url}, model: {info['n_layer']} layers x {info['n_embd']}, "
          f"{len(texts)} distinct texts, mean {statistics.mean(tokens):.1f} tokens")  # fmt: skip
    print("| concurrency | requests | errors | wall s | req/s | msg/s | p50 ms | p95 ms | p99 ms "
          "| GFLOP/s | of limit |\n|---|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    p50_at_1 = None
    for level in levels:
        r = run_level(f"{url}/predict", texts, level, args.requests, args.max_seconds)
        done = len(r["latencies"])
        rate = done / r["wall"]
        flops = sum(tokens[i % len(texts)] for i in r["indices"]) * flops_per_token / r["wall"]
        limit = f"{flops / 1e9 / args.gflops:.0%}" if args.gflops else "-"
        ms = [1000 * percentile(r["latencies"], q) for q in (50, 95, 99)] if done else [0] * 3
        if level == 1 and done:
            p50_at_1 = ms[0]
        print(f"| {level} | {r['sent']} | {r['errors']} | {r['wall']:.1f} | {rate:.2f} | "
              f"{rate:.2f} | {ms[0]:.0f} | {ms[1]:.0f} | {ms[2]:.0f} | {flops / 1e9:.1f} | "
              f"{limit} |")  # fmt: skip
    if args.ckpt:
        bare = 1000 * bare_classify_seconds(args.ckpt, texts, args.requests, args.max_seconds)
        ratio = f", server p50 at concurrency 1 / bare = {p50_at_1 / bare:.2f}" if p50_at_1 else ""
        print(
            f"bare TextClassifier.classify of one message (the same texts): {bare:.0f} ms "
            f"(median){ratio}"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
