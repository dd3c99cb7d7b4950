"""Oracles for modhifi.audit: the membership attack, its features and the linear probe on
synthetic features, and a whole audit of a tiny seeded model against its own forward passes."""
import pytest
import torch
from torch import nn

from modhifi.audit import (attack_features, audit, balanced, feature_map, membership_auc,
                           membership_scores, model_outputs, probe)
from modhifi.data import Dataset, Split
from modhifi.errors import UserError

# --- audits on synthetic features ---------------------------------------------------------------

def test_membership_auc_separable_and_identical():
    generator = torch.Generator().manual_seed(0)
    members = torch.randn(300, 3, generator=generator) + 4
    non_members = torch.randn(200, 3, generator=generator)
    assert membership_auc(members, non_members) > 0.99
    same = torch.randn(400, 3, generator=generator)
    assert abs(membership_auc(same[:200], same[200:]) - 0.5) < 0.1


def test_attack_features_are_loss_confidence_entropy():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    features = attack_features(logits, torch.tensor([0, 2]))
    p = logits.double().softmax(1)
    assert torch.allclose(features[:, 0], -p[[0, 1], [0, 2]].log())
    assert torch.allclose(features[:, 1], p.max(1).values)
    assert torch.allclose(features[:, 2], -(p * p.log()).sum(1))


def test_probe_on_separable_features():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(300) % 3
    centres = torch.eye(3, 8) * 10
    features = centres[labels] + torch.randn(300, 8, generator=generator)
    result = probe(features[:150], labels[:150], features[150:], labels[150:], num_classes=3)
    assert result.accuracy == 1.0 and result.per_class == (1.0, 1.0, 1.0)


# --- a whole audit of a tiny seeded model --------------------------------------------------------

def tiny_dataset():
    """60 random 8x8 images of 3 classes in three disjoint splits of 20 (the attack needs
    forget-class training images as members and forget-class test images as non-members)."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (60, 1, 8, 8), dtype=torch.uint8, generator=generator)
    labels = torch.arange(60) % 3
    split = [Split(images[i:i + 20], labels[i:i + 20], (0.5,), (0.25,)) for i in (0, 20, 40)]
    return Dataset("tiny", ("a", "b", "c"), *split)


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 6), nn.ReLU(), nn.Linear(6, 3)).eval()


def test_audit_matches_whole_forward_passes():
    model, data, forget = tiny_model(), tiny_dataset(), 1
    result = audit(model, data, forget_class=forget, device="cpu", batch_size=7)
    with torch.no_grad():
        predicted = model(next(data.test.batches(len(data.test)))).argmax(1)
        features = {name: model[:-1](next(split.batches(len(split))))
                    for name, split in (("calibration", data.calibration), ("test", data.test))}
    correct = predicted == data.test.labels
    is_forget = data.test.labels == forget
    assert result.forget_accuracy == float(correct[is_forget].float().mean())
    assert result.retain_accuracy == float(correct[~is_forget].float().mean())
    assert result.test_accuracy == int(correct.sum()) / len(correct)  # counts, exactly
    assert result.per_class == tuple(float(correct[data.test.labels == c].float().mean())
                                     for c in range(3))
    # the probe reads the final classifier's input, whatever the batch size
    expected = probe(features["calibration"], data.calibration.labels, features["test"],
                     data.test.labels, num_classes=3)
    assert result.probe_forget_accuracy == expected.per_class[forget]
    assert result.probe_accuracy == expected.accuracy
    # the attack: seeded forget-class training images (as many as forget-class test images)
    # against the forget-class test images, on logits of whole forward passes
    train = data.train
    members = balanced((train.labels == forget).nonzero().squeeze(1),
                        is_forget.nonzero().squeeze(1), 0)[0].sort().values
    with torch.no_grad():
        member_logits = model(next(train.subset(members).batches(len(members))))
        test_logits = model(next(data.test.batches(len(data.test))))
    attack = membership_auc(attack_features(member_logits, train.labels[members]),
                            attack_features(test_logits[is_forget], data.test.labels[is_forget]))
    assert result.mia_auc == pytest.approx(attack, abs=1e-9)
    assert all(p.grad is None for p in model.parameters())


def test_membership_scores_are_the_attack_features_of_whole_forward_passes():
    model, data, forget = tiny_model(), tiny_dataset(), 1
    scores = membership_scores(model, data, forget_class=forget, device="cpu", batch_size=5)
    train, test = data.train, data.test
    members, non_members = balanced((train.labels == forget).nonzero().squeeze(1),
                                    (test.labels == forget).nonzero().squeeze(1), 0)
    for name, split, index in (("member", train, members), ("non-member", test, non_members)):
        index = index.sort().values
        with torch.no_grad():
            logits = model(next(split.subset(index).batches(len(index))))
        expected = attack_features(logits, split.labels[index])
        shown = scores[scores["sample"] == name]
        assert torch.allclose(torch.tensor(shown["loss"].to_numpy()), expected[:, 0], atol=1e-5)
        assert torch.allclose(torch.tensor(shown["confidence"].to_numpy()), expected[:, 1],
                              atol=1e-6)


def test_the_feature_map_is_the_first_models_principal_plane():
    """Against scikit-learn's PCA of the same penultimate features (each axis up to its sign):
    the first model defines the plane, the second is projected into it, not refitted."""
    from sklearn.decomposition import PCA

    data = tiny_dataset()
    before, after = tiny_model(), tiny_model()
    with torch.no_grad():
        after[-1].weight.mul_(-1)  # only the classifier changes: the features stay put
        after[3].weight.mul_(2)    # the features double: projected, not refitted
        after[3].bias.mul_(2)
    frame = feature_map({"before": before, "after": after}, data.test, classes=(1, 2),
                        device="cpu", per_class=4)
    index = torch.cat([(data.test.labels == c).nonzero().squeeze(1)[:4] for c in (1, 2)])
    chosen = data.test.subset(index.sort().values)
    with torch.no_grad():
        features = before[:-1](next(chosen.batches(len(chosen)))).double().numpy()
    pca = PCA(n_components=2).fit(features)
    shown = frame[frame["model"] == "before"][["x", "y"]].to_numpy()
    expected = pca.transform(features)
    assert abs(shown) == pytest.approx(abs(expected), abs=1e-6)
    doubled = frame[frame["model"] == "after"][["x", "y"]].to_numpy()
    assert abs(doubled) == pytest.approx(abs(pca.transform(2 * features)), abs=1e-5)


def test_model_outputs_need_a_final_linear_classifier():
    torch.manual_seed(0)  # a fully convolutional head: pooling 3 channels gives the logits
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    with pytest.raises(UserError) as error:
        model_outputs(model, tiny_dataset(), device="cpu")
    assert "nn.Linear classifier" in str(error.value) and "\n" not in str(error.value)


def test_agreement_counts_same_predictions_per_group():
    from modhifi.audit import agreement

    data, forget = tiny_dataset(), 1
    first, second = tiny_model(), tiny_model()
    with torch.no_grad():
        second[-1].bias += torch.tensor([0.0, -0.25, 0.0])  # some predictions move
    result = agreement(first, second, data.test, forget_class=forget, device="cpu")
    with torch.no_grad():  # one image at a time
        pairs = [(int(first(data.test.normalise(x[None])).argmax()),
                  int(second(data.test.normalise(x[None])).argmax()), int(y))
                 for x, y in zip(data.test.images, data.test.labels)]
    same = [a == b for a, b, _ in pairs]
    in_forget = [y == forget for *_, y in pairs]
    expected = (sum(s for s, f in zip(same, in_forget) if f) / sum(in_forget),
                sum(s for s, f in zip(same, in_forget) if not f) / (len(pairs) - sum(in_forget)))
    assert (result.forget, result.retain) == pytest.approx(expected)
    assert 0 < sum(same) < len(same)  # the bias moved some predictions, not all
    assert agreement(first, first, data.test, forget_class=forget, device="cpu").retain == 1.0
