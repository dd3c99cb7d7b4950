"""Would a sequential refit meet the accuracy bars of issue 16? (an experiment, not a library
option).

The library's refit fits each consumer of removed channels on the dense model's statistics: the
kept inputs as the dense model computes them. After the cut, a consumer's inputs are those of
the pruned network, whose earlier layers changed too. Here each consumer, in forward order, is
fitted again by least squares of the dense model's output on the pruned network's own inputs
(the cross moment of its inputs in both networks, over the calibration images), starting from
the one-shot refit; optionally with BatchNorm recalibrated before each consumer's statistics
(`recal_each`), and with per-feature centred moments (`centered`). Then the channels are cut and
BatchNorm recalibrated as usual, and the test split evaluated.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/sequential_refit.py

`fmnist-resnet`, 2,000 calibration images in batches of 500, the default plan (greedy ranking,
uniform, multiples of 8) at half and two-thirds of the MACs. Prints one line per variant.
"""
from __future__ import annotations

import time

import torch

from modhifi.fidelity import _ridge_solve
from modhifi.hooks import private_copy
from modhifi.metrics import evaluate
from modhifi.moments import _patches
from modhifi.prune import analyse
from modhifi.prune.apply import compensate, cut_channels, kept_inputs, recalibrate_batchnorm
from modhifi.zoo import open_subject


def main() -> None:
    torch.manual_seed(0)
    device = torch.device("cpu")
    subject = open_subject("fmnist-resnet", device=device)
    dataset = subject.dataset
    calibration = list(dataset.calibration.subset(slice(0, 2000)).batches(500))
    calibration = [b[0] if isinstance(b, (tuple, list)) else b for b in calibration]
    analysis = analyse(subject.loaded.model, calibration, device=device,
                       input_shape=dataset.input_shape)
    dense = analysis.model

    def accuracy(model) -> float:
        return evaluate(model, dataset.test, device=device,
                        num_classes=dataset.num_classes).accuracy

    def inputs_of(model, name, batch):
        got = {}
        hook = model.get_submodule(name).register_forward_pre_hook(
            lambda module, args: got.__setitem__("x", args[0]))
        with torch.no_grad():
            model(batch)
        hook.remove()
        return got["x"]

    def sequential(plan, recal_each: bool, centered: bool):
        removed = plan.removed_channels()
        kept = kept_inputs(analysis.structure, dense, removed)
        model = private_copy(dense)
        compensate(model, analysis.fidelity, kept, "refit")
        for name in [n for n, _ in dense.named_modules() if n in kept]:  # forward order
            if recal_each:
                recalibrate_batchnorm(model, calibration)
                model.eval()
            layer = dense.get_submodule(name)
            W = layer.weight.detach().double().reshape(layer.weight.shape[0], -1)  # (c_out, d)
            K = W.shape[1] // layer.weight.shape[1]
            C = (kept[name][:, None] * K + torch.arange(K)).flatten()  # kept patch features
            H = G = sum_pruned = sum_dense = 0
            n = 0
            for batch in calibration:
                P = _patches(layer, inputs_of(dense, name, batch)).double().reshape(
                    -1, W.shape[1])                                      # (N·L, d) dense
                Q = _patches(layer, inputs_of(model, name, batch)).double().reshape(
                    -1, W.shape[1])[:, C]                                # (N·L, |C|) pruned
                H, G = H + Q.T @ Q, G + Q.T @ P
                sum_pruned, sum_dense, n = sum_pruned + Q.sum(0), sum_dense + P.sum(0), n + len(P)
            H, G = H / n, G / n
            if centered:
                mean_pruned, mean_dense = sum_pruned / n, sum_dense / n
                H = H - mean_pruned[:, None] * mean_pruned[None]
                G = G - mean_pruned[:, None] * mean_dense[None]
            new = torch.zeros_like(W)
            new[:, C] = _ridge_solve(H, G @ W.T, 1e-4).T
            with torch.no_grad():
                model.get_submodule(name).weight.copy_(new.reshape(layer.weight.shape).float())
        cut_channels(model, removed, dataset.input_shape)
        recalibrate_batchnorm(model, calibration)
        return model.eval()

    print(f"dense {accuracy(dense):.4f}")
    for target in (0.5, 0.67):
        plan = analysis.plan(target, target_kind="macs")
        print(f"{target} ({plan.speedup_macs:.2f}x fewer MACs): one-shot refit "
              f"{accuracy(analysis.apply(plan)):.4f}", flush=True)
        for recal_each in (False, True):
            for centered in (False, True):
                start = time.perf_counter()
                result = accuracy(sequential(plan, recal_each, centered))
                print(f"{target} sequential recal_each={recal_each} centered={centered}: "
                      f"{result:.4f} ({time.perf_counter() - start:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
