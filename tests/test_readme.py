"""The README's Python snippets run as written (a user copies them first): with a small model
and data standing in for the names they take as given."""

import re
from pathlib import Path

import torch
from torch import nn

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_the_readme_snippets_run():
    snippets = _snippets()
    assert len(snippets) >= 2  # "Use it" and train_step
    g = torch.Generator().manual_seed(0)
    x_all = torch.randn(96, 6, generator=g)
    y_all = (x_all[:, :3] @ torch.randn(3, 4, generator=g)).argmax(1)
    train_set = torch.utils.data.TensorDataset(x_all[:64], y_all[:64])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.1), nn.Tanh(), nn.Linear(16, 4))
    namespace = {
        "model": model, "train_set": train_set, "N": len(train_set), "x_test": x_all[64:],
        "loader": torch.utils.data.DataLoader(train_set, batch_size=16, shuffle=True),
        "x": x_all[:16], "y": y_all[:16],
    }  # fmt: skip
    before = [p.detach().clone() for p in model.parameters()]
    for code in snippets:
        exec(compile(code, str(README), "exec"), namespace)
    probs = namespace["probs"]
    assert probs.shape == (32, 4)
    torch.testing.assert_close(probs.sum(1), torch.ones(32))
    assert torch.isfinite(namespace["loss"])
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # it trained
