"""BayesAdam inside Lightning: DDP on 2 CPU processes, the posterior logged by a callback, and a
run resumed from its checkpoint that ends bitwise where the uninterrupted run ends.

    python examples/06_lightning_ddp.py [--quick] [--devices 2]

Lightning's "ddp" strategy starts the other process by re-running this script.
"""

import argparse
import os
import tempfile

import lightning as L
import torch
import torch.nn.functional as F

import effortless as ef
from effortless import data
from effortless.integrations.lightning import PosteriorMetrics
from effortless.models import MLP


class Classifier(L.LightningModule):
    def __init__(self, n_data: int):
        super().__init__()
        self.net = MLP(40, [128, 128], 10)
        self.n_data = n_data

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", F.cross_entropy(self(x), y), sync_dist=True)

    def configure_optimizers(self):
        # n_data: the whole training set (every rank sees 1/world of it per epoch)
        return ef.BayesAdam(self.parameters(), n_data=self.n_data, lr=2e-3, fused=False,
                            generator=torch.Generator().manual_seed(0))  # fmt: skip


def fit(split, epochs, devices, root, ckpt_path=None, save_as=None):
    L.seed_everything(0, workers=True)
    model = Classifier(len(split.x_train))
    train_set = torch.utils.data.TensorDataset(split.x_train, split.y_train)
    train = torch.utils.data.DataLoader(train_set, batch_size=64, shuffle=True)
    val = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(split.x_test, split.y_test), batch_size=256)  # fmt: skip
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        callbacks=[PosteriorMetrics(n_samples=4)], num_sanity_val_steps=0,
        logger=L.pytorch.loggers.CSVLogger(root), enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, deterministic=True,
    )  # fmt: skip
    trainer.fit(model, train, val, ckpt_path=ckpt_path)
    if save_as:
        trainer.save_checkpoint(save_as)
    return trainer, model


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--devices", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if "LOCAL_RANK" not in os.environ:  # the launching process: both ranks run on this machine
        os.environ["MASTER_ADDR"] = "127.0.0.1"
    split = data.mnist1d(n=1200 if args.quick else 5000)
    epochs = 2 if args.quick else 6
    # the same directory on every rank (the other rank re-runs this script)
    root = os.environ.setdefault("EXAMPLE_ROOT", tempfile.mkdtemp(prefix="effortless-lightning-"))
    ckpt = os.path.join(root, "half.ckpt")
    full_trainer, full = fit(split, epochs, args.devices, root)
    _, _ = fit(split, epochs // 2, args.devices, root, save_as=ckpt)
    resumed_trainer, resumed = fit(split, epochs, args.devices, root, ckpt_path=ckpt)
    same = all(torch.equal(a, b) for a, b in zip(full.parameters(), resumed.parameters()))
    if full_trainer.global_rank == 0:
        logged = {k: round(float(v), 4) for k, v in full_trainer.callback_metrics.items()
                  if k.startswith("posterior/")}  # fmt: skip
        print(f"{args.devices} process(es), {epochs} epochs: {logged}")
        print(f"resumed from the epoch-{epochs // 2} checkpoint: weights identical to the uninterrupted run: "
              f"{same}", flush=True)  # fmt: skip
        if not same:
            raise SystemExit("resumed run differs from the uninterrupted one")
    # tear the process group down before the interpreter exits: gloo's threads otherwise may abort
    # the process at shutdown ("terminate called without an active exception")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
