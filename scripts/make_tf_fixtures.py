"""Write the OpenAI-format TensorFlow checkpoints that the weight-loading tests read.

OpenAI published GPT-2 as TensorFlow checkpoints (``model.ckpt.index`` plus
``model.ckpt.data-00000-of-00001``, with ``hparams.json``). Our reader needs no
TensorFlow, so the tests must read files that TensorFlow itself wrote: this script
writes small ones once, with TensorFlow, and they are committed under
``tests/fixtures/openai_tf/``. Each fixture folder holds

    openai/      the checkpoint as OpenAI's folders hold it (TensorFlow's SaveV2)
    reference/   the same weights as transformers' ``save_pretrained`` writes them

so a test loads ``reference/`` with transformers and ``openai/`` with ours and
compares logits. Re-run it only to change the fixtures (it needs TensorFlow, which
the project's ``dev`` extra does not install):

    pip install tensorflow-cpu transformers
    python scripts/make_tf_fixtures.py            # rewrites tests/fixtures/openai_tf/
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import numpy as np
import torch

# name: (n_embd, n_layer, n_head, n_positions, vocab_size, seed); small enough to
# commit (a few KB each), and two shapes so that a swapped dimension would show.
FIXTURES = {
    "e8_l2_h2_ctx8_v50": (8, 2, 2, 8, 50, 5),
    "e12_l1_h3_ctx10_v37": (12, 1, 3, 10, 37, 6),
}
OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "openai_tf"


def reference_model(n_embd: int, n_layer: int, n_head: int, n_positions: int, vocab: int,
                    seed: int) -> torch.nn.Module:  # fmt: skip
    """A random transformers ``GPT2Model`` with random LayerNorm parameters too, so that
    a swapped gain and shift would show in the logits."""
    import transformers

    cfg = transformers.GPT2Config(
        n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_positions=n_positions,
        vocab_size=vocab, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.GPT2Model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def openai_name(key: str) -> str:
    """transformers' tensor name to OpenAI's TensorFlow variable name."""
    if key in ("wte.weight", "wpe.weight"):
        return "model/" + key.split(".")[0]
    parts = re.sub(r"^h\.(\d+)\.", r"h\1.", key).split(".")
    module, leaf = parts[-2], parts[-1]
    suffix = "b" if leaf == "bias" else ("g" if module.startswith("ln_") else "w")
    return "model/" + "/".join([*parts[:-1], suffix])


def write_openai_checkpoint(model: torch.nn.Module, folder: Path) -> None:
    """The model's weights under OpenAI's names, saved by TensorFlow's own SaveV2."""
    import tensorflow as tf

    arrays: dict[str, np.ndarray] = {}
    for key, tensor in model.state_dict().items():
        if re.search(r"\.attn\.(bias|masked_bias)$", key):
            continue  # mask buffers, not weights
        array = tensor.numpy()
        name = openai_name(key)
        if name.endswith("/w"):
            array = array[None]  # OpenAI's conv1d weights are (1, in, out)
        arrays[name] = np.ascontiguousarray(array)
    folder.mkdir(parents=True)
    names = sorted(arrays)
    tf.raw_ops.SaveV2(
        prefix=str(folder / "model.ckpt"),
        tensor_names=names,
        shape_and_slices=[""] * len(names),
        tensors=[arrays[n] for n in names],
    )
    cfg = model.config
    hparams = {"n_vocab": cfg.vocab_size, "n_ctx": cfg.n_positions, "n_embd": cfg.n_embd,
               "n_head": cfg.n_head, "n_layer": cfg.n_layer}  # fmt: skip
    (folder / "hparams.json").write_text(json.dumps(hparams) + "\n")
    (folder / "checkpoint").write_text(
        'model_checkpoint_path: "model.ckpt"\nall_model_checkpoint_paths: "model.ckpt"\n'
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="folder to (re)write")
    args = parser.parse_args()
    import tensorflow as tf

    for name, (*shape, seed) in FIXTURES.items():
        folder = args.out / name
        shutil.rmtree(folder, ignore_errors=True)
        model = reference_model(*shape, seed=seed)
        model.save_pretrained(folder / "reference", safe_serialization=True)
        write_openai_checkpoint(model, folder / "openai")
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        print(f"{folder}: {size / 1024:.1f} KiB")
    print(f"written with TensorFlow {tf.__version__}")


if __name__ == "__main__":
    main()
