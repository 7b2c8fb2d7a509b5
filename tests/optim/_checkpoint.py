"""A model and optimizer checkpoint through torch.save and torch.load(weights_only=True), in memory."""

import io

import torch


def round_trip(model, opt) -> dict:
    """``{"model": ..., "opt": ...}`` state dicts as a fresh process would load them from disk."""
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)
