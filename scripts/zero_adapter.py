"""Copy an adapter with every lora_B set to zero: the base model, in adapter form.

`lorafit eval` on the copy scores the untouched base model through exactly the pipeline that
scores the trained adapter (same prompts, truncation, precision, generation settings), which is
how the README's "before" numbers are measured. Saved modules (a classifier head, a trained
lm_head) are kept as trained, so this is a true baseline only for adapters without them.

    python scripts/zero_adapter.py runs/smollm2-newsgroups-sft/adapter runs/smollm2-newsgroups-sft/base-adapter
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def main(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst)
    weights = load_file(src / "adapter_model.safetensors")
    zeroed = {k: torch.zeros_like(v) if k.endswith("lora_B.weight") else v for k, v in weights.items()}
    save_file(zeroed, dst / "adapter_model.safetensors", metadata={"format": "pt"})
    print(f"{dst}: {sum(k.endswith('lora_B.weight') for k in zeroed)} lora_B tensors zeroed")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
