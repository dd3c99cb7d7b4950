"""The audit of forgetting (method.md §4, item 4): what a model still knows about one class.

Forget, retain, test and per-class accuracy on the test split; a membership-inference attack on
the forget class (forget-class training images against forget-class test images); a linear probe
on penultimate features (the final classifier's input). Labels are read here and only here: the
edit in `modhifi.unlearn` uses them only to select the forget class.

`forward_order` and `classifier_name` live in `modhifi.trace`, so unlearn imports audit and
audit never imports unlearn.
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor, nn

from modhifi.data import Dataset, Split
from modhifi.errors import UserError
from modhifi.trace import classifier_name, forward_order
from modhifi.hooks import hooked
from modhifi.metrics import Evaluation, evaluation_from, predict


def attack_features(logits: Tensor, labels: Tensor) -> Tensor:
    """The membership attack's features of each sample: loss, max confidence, softmax entropy.

    Args:
        logits: (N, num_classes).
        labels: (N,) true classes.

    Returns:
        (N, 3) float64.
    """
    log_p = logits.double().log_softmax(1)  # (N, K)
    p = log_p.exp()
    loss = -log_p.gather(1, labels[:, None].long())[:, 0]  # (N,)
    return torch.stack([loss, p.max(1).values, -(p * log_p).sum(1)], dim=1)


def balanced(members: Tensor, non_members: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded subsamples of both sets down to the smaller set's size."""
    n = min(len(members), len(non_members))
    generator = torch.Generator().manual_seed(seed)
    return (members[torch.randperm(len(members), generator=generator)[:n]],
            non_members[torch.randperm(len(non_members), generator=generator)[:n]])


def membership_samples(dataset: Dataset, *, forget_class: int,
                       seed: int = 0) -> tuple[Tensor, Tensor]:
    """The membership attack's samples: indices of the forget class's training images (members)
    and test images (non-members), seeded subsamples of the same size; refused in one line where
    either split has fewer than 2 (checked before any pass over the images)."""
    members = (dataset.train.labels == forget_class).nonzero().squeeze(1)
    non_members = (dataset.test.labels == forget_class).nonzero().squeeze(1)
    if min(len(members), len(non_members)) < 2:
        raise UserError(f"the membership attack needs at least 2 images of class {forget_class} "
                        f"in the train and in the test split ({len(members)} and "
                        f"{len(non_members)} in {dataset.name}): forget another class, or add "
                        "images of this one")
    return balanced(members, non_members, seed)


def membership_auc(members: Tensor, non_members: Tensor, *, seed: int = 0, folds: int = 5) -> float:
    """How well a logistic-regression attack tells members from non-members (cross-validated AUC).

    Args:
        members: (N1, F) attack features of samples the model was trained on.
        non_members: (N2, F) features of samples it never saw.
        seed: for the balancing subsample and the folds.
        folds: stratified cross-validation folds.

    Returns:
        Mean ROC AUC over the folds: ~0.5 means the attack cannot tell, 1.0 means it always can.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    members, non_members = balanced(members, non_members, seed)
    if len(members) < 2:
        raise UserError("the membership attack needs at least 2 members and 2 non-members; "
                        "use a dataset with more samples of the forget class")
    X = torch.cat([members, non_members]).double().numpy()
    y = [1] * len(members) + [0] * len(non_members)
    folds = StratifiedKFold(n_splits=min(folds, len(members)), shuffle=True, random_state=seed)
    attack = make_pipeline(StandardScaler(), LogisticRegression())
    return float(cross_val_score(attack, X, y, cv=folds, scoring="roc_auc").mean())


def probe(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
          *, num_classes: int) -> Evaluation:
    """A linear probe: logistic regression on standardised features, evaluated on held-out ones.

    Args:
        train_features: (N, F) features to fit on; train_labels: (N,).
        test_features: (M, F) features to evaluate on; test_labels: (M,).
        num_classes: classes of the task.

    Returns:
        The probe's `Evaluation` on the test features (overall and per class).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300))
    model.fit(train_features.double().numpy(), train_labels.numpy())  # a near-optimum will do
    predicted = torch.from_numpy(model.predict(test_features.double().numpy())).long()
    return evaluation_from(predicted, test_labels.long(), num_classes=num_classes)


@torch.inference_mode()
def _logits_and_features(model: nn.Module, classifier: str, split: Split, *,
                         device: torch.device | str, batch_size: int) -> tuple[Tensor, Tensor]:
    """(N, num_classes) logits and (N, F) penultimate features (the classifier's input), on CPU."""
    features: list[Tensor] = []
    keep = lambda layer, args: features.append(args[0].reshape(len(args[0]), -1).float().cpu())  # noqa: E731
    with hooked(model, before={classifier: keep}) as run:
        logits = [run(x).float().cpu() for x in split.batches(batch_size, device=device)]
    return torch.cat(logits), torch.cat(features)


@dataclass(frozen=True)
class Audit:
    """What a model knows about the forget class (all accuracies on the full test split)."""

    forget_accuracy: float  # test samples of the forget class
    retain_accuracy: float  # test samples of every other class
    test_accuracy: float
    per_class: tuple[float, ...]
    mia_auc: float  # membership attack on the forget class: ~0.5 = members look like non-members
    probe_forget_accuracy: float  # linear probe on penultimate features, forget-class test samples
    probe_accuracy: float  # the same probe on all test samples


# The audit's figures as the tables name them.
AUDIT_FIGURES = {"forget_accuracy": "forget accuracy", "retain_accuracy": "retain accuracy",
                 "test_accuracy": "test accuracy", "mia_auc": "membership attack AUC",
                 "probe_forget_accuracy": "probe accuracy (forget class)",
                 "probe_accuracy": "probe accuracy (all classes)"}


def audit_frame(audits: dict[str, Audit]) -> pd.DataFrame:
    """One row per audit figure: metric, then one column per audit (name -> Audit)."""
    return pd.DataFrame([{"metric": label, **{name: getattr(figures, key)
                                              for name, figures in audits.items()}}
                         for key, label in AUDIT_FIGURES.items()])


def summary_keys(before: Audit, after: Audit) -> dict:
    """The `unlearn` command's audit keys (contract.md), before and after the edit."""
    return {"forget_accuracy_before": before.forget_accuracy,
            "forget_accuracy_after": after.forget_accuracy,
            "retain_accuracy_before": before.retain_accuracy,
            "retain_accuracy_after": after.retain_accuracy,
            "mia_before": before.mia_auc, "mia_after": after.mia_auc,
            "probe_accuracy_before": before.probe_forget_accuracy,
            "probe_accuracy_after": after.probe_forget_accuracy}


def per_class_frame(classes: tuple[str, ...], audits: dict[str, Audit]) -> pd.DataFrame:
    """One row per class: class, then each audit's test accuracy on it."""
    return pd.DataFrame({"class": classes, **{name: figures.per_class
                                              for name, figures in audits.items()}})


@dataclass(frozen=True, eq=False)
class Outputs:
    """What the audits read from one model whatever the forget class (reusable across classes)."""

    test_logits: Tensor  # (M, num_classes) on the whole test split, on the CPU
    probe: Evaluation  # linear probe on penultimate features: fit on calibration, tested on test


def model_outputs(model: nn.Module, dataset: Dataset, *, device: torch.device | str,
                  batch_size: int = 256) -> Outputs:
    """Test logits and the linear probe of one model (one pass over test and calibration splits).

    Args:
        model: the network, in eval mode on `device`.
        dataset: its dataset.
        device: where the forward passes run.
        batch_size: images per forward pass.

    Returns:
        The `Outputs`.
    """
    example = next(dataset.test.batches(1, device=device))
    classifier = classifier_name(model, forward_order(model, example))
    run = dict(device=device, batch_size=batch_size)
    test_logits, test_features = _logits_and_features(model, classifier, dataset.test, **run)
    _, calibration_features = _logits_and_features(model, classifier, dataset.calibration, **run)
    probed = probe(calibration_features, dataset.calibration.labels, test_features,
                   dataset.test.labels, num_classes=dataset.num_classes)
    return Outputs(test_logits, probed)


def audit(model: nn.Module, dataset: Dataset, *, forget_class: int, device: torch.device | str,
          batch_size: int = 256, seed: int = 0, outputs: Outputs | None = None) -> Audit:
    """Accuracies, membership attack and linear probe of one model for one forget class.

    Labels are used here (and only here). Members are forget-class training images, subsampled
    (seeded) to the number of forget-class test images, the non-members.

    Args:
        model: the network, in eval mode on `device`.
        dataset: its dataset.
        forget_class: the class that should be forgotten.
        device: where the forward passes run.
        batch_size: images per forward pass.
        seed: for the membership attack's subsample and folds.
        outputs: this model's `model_outputs`, when already computed.

    Returns:
        The `Audit`.
    """
    test, train = dataset.test, dataset.train
    members = membership_samples(dataset, forget_class=forget_class, seed=seed)[0].sort().values
    outputs = outputs or model_outputs(model, dataset, device=device, batch_size=batch_size)
    with torch.inference_mode():
        member_logits = torch.cat([model(x).float().cpu() for x in train.subset(members).batches(
            batch_size, device=device)])
    return audit_from(outputs.test_logits, test.labels, member_logits, train.labels[members],
                      outputs.probe, forget_class=forget_class, seed=seed)


def audit_from(test_logits: Tensor, test_labels: Tensor, member_logits: Tensor,
               member_labels: Tensor, probed: Evaluation, *, forget_class: int,
               seed: int = 0) -> Audit:
    """The `Audit` from a classifier's outputs, whatever the model (images or texts).

    Args:
        test_logits: (M, num_classes) on the whole test split; test_labels: (M,).
        member_logits: (n, num_classes) on forget-class training samples (the members);
            member_labels: (n,).
        probed: the linear probe's evaluation on the test split (`probe`).
        forget_class: the class that should be forgotten.
        seed: for the membership attack's subsample and folds.
    """
    num_classes = test_logits.shape[1]
    predicted = test_logits.argmax(1)  # (M,)
    evaluation = evaluation_from(predicted, test_labels, num_classes=num_classes)
    is_forget = test_labels == forget_class  # (M,)
    correct = predicted == test_labels  # (M,)
    mia = membership_auc(attack_features(member_logits, member_labels),
                         attack_features(test_logits[is_forget], test_labels[is_forget]),
                         seed=seed)
    return Audit(forget_accuracy=float(correct[is_forget].float().mean()),
                 retain_accuracy=float(correct[~is_forget].float().mean()),
                 test_accuracy=evaluation.accuracy, per_class=evaluation.per_class, mia_auc=mia,
                 probe_forget_accuracy=probed.per_class[forget_class],
                 probe_accuracy=probed.accuracy)


@dataclass(frozen=True)
class Agreement:
    """How alike two models predict the test split: the edited model against the model
    retrained without the forget class, say."""

    forget: float  # share of the forget class's test images given the same prediction
    retain: float  # the same share over every other class's test images


def agreement(model: nn.Module, reference: nn.Module, split: Split, *, forget_class: int,
              device: torch.device | str, batch_size: int = 256) -> Agreement:
    """The `Agreement` of `model` with `reference` (both in eval mode on `device`) on `split`."""
    same = (predict(model, split, device=device, batch_size=batch_size).argmax(1)
            == predict(reference, split, device=device, batch_size=batch_size).argmax(1))  # (N,)
    is_forget = split.labels == forget_class
    return Agreement(forget=float(same[is_forget].float().mean()),
                     retain=float(same[~is_forget].float().mean()))


def membership_scores(model: nn.Module, dataset: Dataset, *, forget_class: int,
                      device: torch.device | str, batch_size: int = 256,
                      seed: int = 0) -> pd.DataFrame:
    """The attack's evidence sample by sample: loss and confidence of the forget class's members
    (training images, subsampled as in `audit`) and non-members (its test images). Where the two
    distributions coincide, no attack on these scores can tell them apart.

    Returns:
        Columns: sample ("member" or "non-member"), loss, confidence.
    """
    test, train = dataset.test, dataset.train
    members, non_members = membership_samples(dataset, forget_class=forget_class, seed=seed)
    frames = []
    with torch.inference_mode():
        for name, split, index in (("member", train, members), ("non-member", test, non_members)):
            chosen = split.subset(index.sort().values)
            logits = torch.cat([model(x).float().cpu()
                                for x in chosen.batches(batch_size, device=device)])
            evidence = attack_features(logits, chosen.labels)  # (n, 3): loss, confidence, entropy
            frames.append(pd.DataFrame({"sample": name, "loss": evidence[:, 0].numpy(),
                                        "confidence": evidence[:, 1].numpy()}))
    return pd.concat(frames, ignore_index=True)


def feature_map(models: dict[str, nn.Module], split: Split, *, classes: tuple[int, ...],
                device: torch.device | str, per_class: int = 60,
                batch_size: int = 256) -> pd.DataFrame:
    """Penultimate features (the classifier's input) of a few classes' images, projected on the
    two principal axes of the first model's features, so that every model is drawn in the same
    plane: where a forgotten class's cloud goes after the edit.

    Args:
        models: name -> network (the first one defines the plane), each in eval mode on `device`.
        split: the images (their labels choose which to show).
        classes: the classes to show; the first `per_class` images of each.

    Returns:
        Columns: model, label, x, y.
    """
    index = torch.cat([(split.labels == c).nonzero().squeeze(1)[:per_class] for c in classes])
    chosen = split.subset(index.sort().values)
    example = next(chosen.batches(1, device=device))
    frames, axes = [], None
    for name, model in models.items():
        classifier = classifier_name(model, forward_order(model, example))
        with torch.inference_mode():
            _, features = _logits_and_features(model, classifier, chosen, device=device,
                                               batch_size=batch_size)
        features = features.double()  # (n, F)
        if axes is None:  # the first model's principal axes: mean and top-2 right singular vectors
            mean = features.mean(0)
            axes = (mean, torch.linalg.svd(features - mean, full_matrices=False).Vh[:2].T)
        if features.shape[1] != axes[1].shape[0]:
            raise UserError("the models' penultimate features differ in width; compare a model "
                            "with its own edited copy")
        xy = (features - axes[0]) @ axes[1]  # (n, 2)
        frames.append(pd.DataFrame({"model": name, "label": chosen.labels.numpy(),
                                    "x": xy[:, 0].numpy(), "y": xy[:, 1].numpy()}))
    return pd.concat(frames, ignore_index=True)
