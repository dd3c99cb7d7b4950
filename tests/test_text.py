"""The text path against oracles, on a tiny random BERT (any local folder in the Hugging Face
layout) and, once, on the real all-MiniLM-L6-v2 through the command line."""
import copy
import json
import shutil

import pytest
import torch
from torch import nn

from modhifi.errors import UserError
from modhifi.text.components import analyse_text, consumer, sentence_macs
from modhifi.text.corpus import load_fortunes
from modhifi.text.encoder import embed, load_encoder, model_folder, token_batches, transformer_layers
from modhifi.text.quality import agreement, nearest
from modhifi.text.subject import save_text_model
from modhifi.text.surgery import apply_plan
from oracles import PRUNE_KEYS, command_line as cli

TEXTS = ["The cat sat on the mat.", "Computers are fast, people are slow.",
         "A definition: recursion, see recursion.", "Work expands to fill the time.",
         "Politics is the art of the possible.", "Science is what we do when we don't know.",
         "Art is a lie that makes us realise truth.", "Wisdom begins in wonder.",
         "Hello", "An unusually long quotation about nothing at all, which goes on and on and on "
         "for a while so that padding matters in every batch it is in."] * 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 2-layer BERT (hidden 32, 4 heads of 8, FFN 48) with MiniLM's tokenizer, saved as a
    plain Hugging Face folder (sentence-transformers adds mean pooling when it loads it)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny")
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=48, max_position_embeddings=128)
    BertModel(config).eval().save_pretrained(folder)
    source = model_folder("minilm-l6")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(source / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def model(tiny):
    return load_encoder(str(tiny), device="cpu")


@pytest.fixture(scope="module")
def analysis(model):
    return analyse_text(model, TEXTS, device="cpu", lam=0.0, batch_size=8)


def token_inputs(model, name, texts=TEXTS):
    """(tokens, c_in) the inputs of module `name` for every real token of `texts`, one text at a
    time (no padding at all: the oracle for the masked statistics)."""
    rows = []
    handle = model.get_submodule(name).register_forward_pre_hook(
        lambda module, args: rows.append(args[0].reshape(-1, args[0].shape[-1])))
    try:
        with torch.inference_mode():
            for text in texts:
                _, features = next(token_batches(model, [text], device="cpu"))
                model(dict(features))
    finally:
        handle.remove()
    return torch.cat(rows).double()


def test_ffn_fidelity_equals_brute_force_on_explicit_per_token_contributions(model, analysis):
    layer = transformer_layers(model)[1]
    x = token_inputs(model, layer.ffn_down)                       # (tokens, 48)
    weight = model.get_submodule(layer.ffn_down).weight.double()  # (32, 48)
    fidelity = analysis.fidelity[layer.ffn_down]
    for c in (0, 7, 31):
        A = x * weight[c]                                         # (tokens, 48): A_ci per token
        Q = A.T @ A / len(A)
        r = Q.sum(1)
        singleton = r**2 / (Q.diagonal() * Q.sum())
        torch.testing.assert_close(fidelity.singleton[c], singleton, rtol=1e-4, atol=1e-7)


def test_head_subset_fidelity_equals_least_squares_on_explicit_head_contributions(model, analysis):
    layer = transformer_layers(model)[0]
    x = token_inputs(model, layer.attention_out)                  # (tokens, 4 heads × 8)
    weight = model.get_submodule(layer.attention_out).weight.double()
    fidelity = analysis.fidelity[layer.attention_out]
    assert fidelity.singleton.shape == (32, 4)                    # heads are the components
    for c, kept in ((0, [1, 3]), (5, [0, 2, 3]), (9, [2])):
        heads = (x.view(len(x), 4, 8) * weight[c].view(4, 8)).sum(2)  # (tokens, 4): A_ch
        y = heads.sum(1)
        delta = torch.linalg.lstsq(heads[:, kept], y[:, None]).solution[:, 0]
        residual = y - heads[:, kept] @ delta
        expected = (1 - residual.square().mean() / y.square().mean()).detach()
        assert fidelity.subset_fidelity(c, kept) == pytest.approx(float(expected), abs=1e-6)


def test_refit_equals_least_squares_with_a_free_bias_on_the_kept_neurons(model, analysis):
    from modhifi.text.surgery import refit

    plan = analysis.plan(0.5, kind="ffn", method="modhifi", round_to=1)
    layer = analysis.layers[0]
    keep = plan.kept[0]
    x = token_inputs(model, layer.ffn_down)
    down = model.get_submodule(layer.ffn_down)
    y = x @ down.weight.double().T + down.bias.double()            # (tokens, 32)
    design = torch.cat([x[:, list(keep)], torch.ones(len(x), 1, dtype=x.dtype)], 1)
    solution = torch.linalg.lstsq(design, y).solution              # (kept + 1, 32)
    weight, bias = refit(analysis, layer, plan, keep)
    torch.testing.assert_close(weight[:, list(keep)].double(), solution[:-1].T, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(bias.double(), solution[-1], rtol=1e-3, atol=1e-4)
    assert weight[:, [i for i in range(48) if i not in keep]].abs().max() == 0


def test_nothing_removed_gives_the_dense_embeddings(model, analysis):
    for kind in ("ffn", "heads"):
        plan = analysis.plan(0.0, kind=kind)
        assert plan.units_after == plan.units_before
        pruned = apply_plan(analysis, plan)
        torch.testing.assert_close(embed(pruned, TEXTS, device="cpu"), embed(model, TEXTS, device="cpu"))


@pytest.mark.parametrize("kind", ["ffn", "heads"])
def test_physical_removal_equals_a_masked_dense_forward(model, analysis, kind):
    """Without compensation, cutting neurons or heads gives exactly the dense model whose
    consumer columns of those components are zero."""
    plan = analysis.plan(0.5, kind=kind, method="random", round_to=1)
    pruned = apply_plan(analysis, plan, compensation="none")
    masked = copy.deepcopy(model)
    width = 1 if kind == "ffn" else 8
    with torch.no_grad():
        for layer, removed in zip(transformer_layers(masked), plan.removed().values()):
            columns = [u * width + j for u in removed for j in range(width)]
            masked.get_submodule(consumer(layer, kind)).weight[:, columns] = 0
    for layer, keep in zip(transformer_layers(pruned), plan.kept):
        assert pruned.get_submodule(consumer(layer, kind)).in_features == len(keep) * width
    torch.testing.assert_close(embed(pruned, TEXTS, device="cpu"), embed(masked, TEXTS, device="cpu"),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["ffn", "heads"])
def test_planned_macs_equal_the_flop_counter_of_the_pruned_model(model, analysis, kind):
    plan = analysis.plan(0.2, kind=kind, target_kind="macs", method="modhifi", round_to=1)
    assert plan.macs_after <= 0.8 * plan.macs_before * (1 + 1e-9)
    pruned = apply_plan(analysis, plan)
    assert sentence_macs(model, TEXTS) == pytest.approx(plan.macs_before, rel=1e-9)
    assert sentence_macs(pruned, TEXTS) == pytest.approx(plan.macs_after, rel=1e-9)


def test_sentence_macs_equal_counting_every_text_on_its_own(model):
    from torch.utils.flop_counter import FlopCounterMode

    texts = TEXTS[:10]
    total = 0
    for text in texts:
        _, features = next(token_batches(model, [text], device="cpu"))
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            model(dict(features))
        length = int(features["attention_mask"].sum())
        attention = 2 * 2 * length * length * 32 * 2 // 2  # QKᵀ and AV, 2 layers, in MACs
        total += counter.get_total_flops() / 2 + (attention if counter.get_total_flops() else 0)
    assert sentence_macs(model, texts) == pytest.approx(total / len(texts), rel=1e-9)


def test_macs_counted_while_another_session_runs_a_model_are_this_models_alone(model):
    """The dashboard counts a text model's MACs (its Overview, every analysis) while other
    sessions run models in other threads: their passes never enter the count, and no
    process-wide hook is left (the flop counter's own module tracker hooks every module of the
    process)."""
    import threading

    from modhifi.text.components import macs_by_module

    serial = macs_by_module(model, TEXTS)
    other, done = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 8)), threading.Event()

    def another_session():
        with torch.inference_mode():
            while not done.is_set():
                other(torch.randn(4, 8))

    thread = threading.Thread(target=another_session)
    thread.start()
    try:
        crowded = [macs_by_module(model, TEXTS) for _ in range(3)]
    finally:
        done.set()
        thread.join()
    assert all(counted == serial for counted in crowded)
    assert serial[""] == sentence_macs(model, TEXTS) > 0
    assert not nn.modules.module._global_forward_hooks
    assert not nn.modules.module._global_forward_pre_hooks


def test_saved_folders_reload_with_the_same_embeddings(model, analysis, tmp_path):
    """Through modhifi, physically smaller; through the model's own library alone too (removed
    heads saved as zeros: a config has one head count for every layer)."""
    from sentence_transformers import SentenceTransformer

    from modhifi.text.surgery import shapes

    for kind in ("ffn", "heads"):
        pruned = apply_plan(analysis, analysis.plan(0.5, kind=kind, round_to=1))
        out = tmp_path / kind
        save_text_model(pruned, out, base="tiny", removed={})
        expected = embed(pruned, TEXTS, device="cpu")
        reloaded = load_encoder(str(out), device="cpu")
        assert shapes(reloaded) == shapes(pruned) != shapes(model)
        torch.testing.assert_close(embed(reloaded, TEXTS, device="cpu"), expected)
        own = SentenceTransformer(str(out), device="cpu", local_files_only=True)
        torch.testing.assert_close(own.encode(TEXTS, convert_to_tensor=True), expected,
                                   rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError, match="exists"):
        save_text_model(pruned, tmp_path / "ffn", base="tiny", removed={})


def test_the_input_model_is_never_modified(model, analysis):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_plan(analysis, analysis.plan(0.5, kind="heads", round_to=1))
    apply_plan(analysis, analysis.plan(0.5, kind="ffn"))
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training


def test_agreement_against_explicit_loops():
    torch.manual_seed(1)
    dense = torch.randn(30, 6)
    modified = dense + 0.8 * torch.randn(30, 6)
    result = agreement(dense, modified)

    def neighbours(E, i):
        sims = [(float(nn.functional.cosine_similarity(E[i], E[j], dim=0)), j)
                for j in range(len(E)) if j != i]
        return [j for _, j in sorted(sims, reverse=True)]

    same = sum(neighbours(dense, i)[0] == neighbours(modified, i)[0] for i in range(30)) / 30
    recall = sum(neighbours(dense, i)[0] in neighbours(modified, i)[:10] for i in range(30)) / 30
    cosines = nn.functional.cosine_similarity(dense, modified, dim=1)
    assert result.retrieval_agreement == pytest.approx(same)
    assert result.recall_at_10 == pytest.approx(recall)
    assert result.embedding_cosine == pytest.approx(float(cosines.mean()), rel=1e-6)
    assert 0 < recall < 1 and same < 1                           # the example is not trivial
    assert agreement(dense, dense).retrieval_agreement == 1.0
    assert nearest(dense, 3).shape == (30, 3)


def test_fortunes_splits_are_whole_disjoint_stratified_and_seeded(tmp_path):
    corpus = load_fortunes()
    splits = (corpus.train, corpus.calibration, corpus.test)
    texts = [set(split.texts) for split in splits]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert all("\n%\n" not in t and t for split in splits for t in split.texts)
    for label in range(len(corpus.categories)):
        counts = [sum(1 for y in split.labels if y == label) for split in splits]
        assert counts[1] > 0 and counts[2] > 0 and counts[0] > counts[2]
    assert load_fortunes().test == corpus.test
    assert load_fortunes(seed=1).test != corpus.test
    with pytest.raises(UserError, match="apt-get install fortunes"):
        load_fortunes(tmp_path)


def refused(capsys, *args) -> tuple[int, list[str]]:
    """The command line's exit code and stderr lines."""
    done = cli(capsys, *args)
    return done.returncode, done.stderr.strip().splitlines()


def test_cli_prunes_a_local_folder_and_the_output_reloads(tiny, model, text_costs, cpu,
                                                          tmp_path, capsys, monkeypatch):
    """To a latency target: the cost model is read from beside the folder (a synthetic one, so
    that what the plan can reach does not depend on the machine's load), the JSON has the
    planned speed-up beside the measured one and the targets tried."""
    import dataclasses

    from modhifi.text.corpus import load_fortunes
    from modhifi.text.latency import TextCosts, shapes_of, timing_batches
    from modhifi.zoo import cost_cache

    out = tmp_path / "pruned"
    monkeypatch.setenv("MODHIFI_CACHE", str(tmp_path / "cache"))
    timing = timing_batches(model, load_fortunes().calibration.texts, batch_size=64, device="cpu")
    costs = dataclasses.replace(_synthetic_text_costs(text_costs), batch_size=64,
                                shapes=shapes_of(timing))
    cost_cache(str(tiny), model, cpu, 64, "fortunes").write_text(costs.to_json())
    monkeypatch.chdir(tiny.parent)  # the model named by a relative path
    done = cli(capsys, "prune", "--model", tiny.name, "--target", "0.1", "--target-kind",
               "latency", "--components", "heads", "--calib-samples", "64", "--json", "--out",
               str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["channels_before"] == 8 and result["channels_after"] < 8
    assert result["speedup_planned"] >= 1 / 0.9 - 1e-9 and result["speedup_measured"] > 0
    assert result["latency_targets_tried"][0] == 0.1  # cut, timed, and cut again if short
    assert isinstance(result["latency_target_met"], bool)
    [cached] = tiny.parent.glob(f"{tiny.name}.latency-b64-*.json")
    assert TextCosts.from_json(cached.read_text()) == costs  # read, not measured again
    assert PRUNE_KEYS <= set(result)  # the shared keys, and the text ones
    assert {"embedding_cosine", "retrieval_agreement", "sentences_per_second_before",
            "sentences_per_second_after"} <= set(result)
    assert result["speedup_eager"] == result["speedup_measured"]  # both timed in eager mode
    assert result["macs_after"] < result["macs_before"]
    monkeypatch.chdir(tmp_path)  # the folder names its base so that it opens from anywhere
    assert json.loads((out / "config.json").read_text())["modhifi_base"] == str(tiny.resolve())
    info = cli(capsys, "info", "--model", str(out), "--json")
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["accuracy"] == pytest.approx(result["accuracy_after"])
    assert json.loads((out / "modhifi_removed.json").read_text())["components"] == "heads"


def test_a_folder_modified_again_lists_every_round_and_reloads_alone_too(tiny, analysis,
                                                                         tmp_path, capsys):
    """Heads pruned, then a category forgotten: the folder keeps the pruning's round and reloads
    with its widths, through modhifi and through sentence-transformers alone, with the same
    embeddings; a further round is listed after the earlier ones."""
    from sentence_transformers import SentenceTransformer

    from modhifi.text.subject import removed_rounds
    from modhifi.text.surgery import shapes

    once, forgot = tmp_path / "once", tmp_path / "forgot"
    done = cli(capsys, "prune", "--model", str(tiny), "--components", "heads", "--target", "0.5",
               "--calib-samples", "16", "--json", "--out", str(once))
    assert done.returncode == 0, done.stderr
    done = cli(capsys, "unlearn", "--model", str(once), "--forget-class", "art", "--json",
               "--out", str(forgot))
    assert done.returncode == 0, done.stderr
    [pruning] = removed_rounds(str(forgot))
    assert pruning == json.loads((once / "modhifi_removed.json").read_text())
    assert pruning["components"] == "heads"
    assert [len(heads) for heads in pruning["removed"].values()] == [2, 2]  # of 4 a layer
    reloaded = load_encoder(str(forgot), device="cpu")
    assert shapes(reloaded)["heads"] == [2, 2]
    own = SentenceTransformer(str(forgot), device="cpu", local_files_only=True)
    torch.testing.assert_close(own.encode(TEXTS, convert_to_tensor=True),
                               embed(reloaded, TEXTS, device="cpu"), rtol=1e-5, atol=1e-6)
    later = {"components": "ffn", "removed": {"0": [1]}}
    save_text_model(reloaded, tmp_path / "again", base=str(tiny), removed=later,
                    earlier=removed_rounds(str(forgot)))
    assert removed_rounds(str(tmp_path / "again")) == [pruning, later]


@pytest.mark.parametrize("args, message", [
    (["--target", "0.99", "--components", "heads"], "cannot be reached"),
    (["--target", "0.3", "--calib-samples", "100000"], "--calib-samples"),
    (["--target", "0.3", "--compensation", "sequential"], "compensation of a text encoder"),
])
def test_cli_bad_input_on_a_text_model_is_one_line_and_exit_2(tiny, args, message, capsys):
    assert message in one_error(capsys, "prune", "--model", str(tiny), *args)


def one_error(capsys, *args) -> str:
    """The one error line of a refused command (after at most two lines of progress: what
    is refused once the model is open), without its prefix."""
    code, lines = refused(capsys, *args)
    errors = [line for line in lines if line.startswith("modhifi: error: ")]
    assert code == 2 and len(errors) == 1 and len(lines) <= 3, lines
    assert not any("Traceback" in line for line in lines)
    return errors[0].removeprefix("modhifi: error: ")


@pytest.mark.parametrize("command", [("theory",), ("bench", "--quick")])
def test_a_command_with_no_text_path_says_so_in_one_line(tiny, capsys, command):
    code, lines = refused(capsys, *command, "--model", str(tiny))
    assert code == 2 and len(lines) == 1 and "not available for text models yet" in lines[0]


def test_a_damaged_folder_is_one_line_naming_what_is_wrong(tiny, model, analysis, tmp_path,
                                                           capsys):
    """A config.json that is not JSON, truncated weights, no tokenizer files (the library falls
    back to five tokens), and a modhifi folder whose weights do not fit the widths its config
    records: one line and exit 2, no traceback."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    (broken / "config.json").write_text("{")
    assert one_error(capsys, "info", "--model", str(broken)).startswith(
        f"{broken / 'config.json'} cannot be read as JSON (")
    shutil.copy(tiny / "config.json", broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert one_error(capsys, "info", "--model", str(broken)).startswith(
        f"cannot load the text model in {broken}: ")
    shutil.copy(tiny / "model.safetensors", broken)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        (broken / name).unlink()
    assert "its tokenizer files (tokenizer.json, vocab.txt) are missing" in one_error(
        capsys, "info", "--model", str(broken))
    saved = tmp_path / "saved"
    save_text_model(apply_plan(analysis, analysis.plan(0.5, kind="heads", round_to=1)), saved,
                    base=str(tiny), removed={})
    config = json.loads((saved / "config.json").read_text())
    config["modhifi_shapes"]["heads"] = [1, 1]  # the weights hold 2 heads a layer (then zeros)
    (saved / "config.json").write_text(json.dumps(config))
    assert "do not fit the widths its config records" in one_error(capsys, "info", "--model",
                                                                   str(saved))


def test_an_encoder_not_laid_out_as_bert_is_refused_in_one_line():
    """MPNet's layers name their attention `attention.attn`: refused, naming BERT's layout."""
    holder = nn.Sequential(nn.Module())
    holder[0].model = nn.Module()
    holder[0].model.encoder = nn.Module()
    layer = nn.Module()
    layer.attention = nn.Module()
    layer.attention.attn = nn.Linear(4, 4)
    holder[0].model.encoder.layer = nn.ModuleList([layer])
    with pytest.raises(UserError, match="layer 0 of the text model is not laid out as BERT's") as e:
        transformer_layers(holder)
    assert "\n" not in str(e.value)


def test_cli_refuses_an_existing_output_folder_before_any_work(tiny, tmp_path, capsys):
    code, lines = refused(capsys, "prune", "--model", str(tiny), "--target", "0.3", "--out",
                          str(tmp_path))
    assert code == 2 and len(lines) == 1 and "folder" in lines[0]


@pytest.mark.zoo  # opt in (-m zoo): the pages' tests prune the real model in the default run
def test_the_real_minilm_is_pruned_end_to_end_from_the_command_line(capsys):
    """all-MiniLM-L6-v2 from its PyPI package, 30% of FFN neurons: the text keys, a smaller and
    faster-by-MACs model, and embeddings still close to the dense ones (the bars themselves are
    measured by benchmarks/text_quality.py; the union rule here, as the greedy ranking of 9,216
    neurons is the slow part and the pages' tests run it)."""
    done = cli(capsys, "prune", "--model", "minilm-l6", "--target", "0.3", "--calib-samples",
               "256", "--method", "modhifi", "--batch-size", "16", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["channels_before"] == 6 * 1536 and result["channels_after"] == 6 * 1072
    assert result["params_after"] < result["params_before"] == 22_713_216
    assert result["speedup_macs"] > 1.2
    assert result["embedding_cosine"] > 0.9 and result["recall_at_10"] > 0.9
    assert abs(result["accuracy_after"] - result["accuracy_before"]) < 0.05
    listed = json.loads(cli(capsys, "models", "--json").stdout)["models"]
    assert any(row["name"] == "minilm-l6" and row["params"] == 22_713_216 for row in listed)


def test_cli_scores_of_a_text_model_cover_every_neuron_and_head(tiny, tmp_path, capsys):
    import pandas as pd

    out = tmp_path / "scores.csv"
    done = cli(capsys, "scores", "--model", str(tiny), "--target", "0.5", "--calib-samples",
               "64", "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(out)
    # 2 layers × (32 outputs × 48 neurons of the down-projection + 32 outputs × 4 heads)
    assert len(table) == json.loads(done.stdout)["rows"] == 2 * (32 * 48 + 32 * 4)
    assert table["singleton_fidelity"].between(0, 1).all()
    kept = table.drop_duplicates(["layer", "in_channel"]).groupby("layer")["kept"].mean()
    assert set(kept.round(3)) == {0.5}  # half of each layer's neurons and heads kept
    # 0.8: out of the heads' reach (one of 4 stays), not of the neurons' (8 of 48 stay)
    done = cli(capsys, "scores", "--model", str(tiny), "--target", "0.8", "--calib-samples",
               "64", "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr
    assert "attention heads: target 0.8 cannot be reached" in done.stderr
    table = pd.read_csv(out)
    heads = table["layer"].str.endswith("attention.output.dense")
    assert table.loc[heads, "kept"].isna().all()
    kept = table[~heads].drop_duplicates(["layer", "in_channel"]).groupby("layer")["kept"]
    assert set(kept.mean().round(3)) == {round(8 / 48, 3)}


# --- ModHiFi-U on text: forgetting a category (modhifi.text.forget) ---------------------------

def tiny_corpus():
    """The ten distinct TEXTS in three categories (by position), every split the same texts."""
    from modhifi.text.corpus import Corpus, TextSplit

    split = TextSplit(tuple(TEXTS), tuple(i % 10 % 3 for i in range(len(TEXTS))))
    return Corpus("tiny", ("a", "b", "c"), split, split, split)


@pytest.fixture(scope="module")
def statistics(model):
    from modhifi.text.forget import topic_statistics

    return topic_statistics(model, tiny_corpus().calibration, category=1, device="cpu",
                            reference_texts=None, folds=2, batch_size=8)


def text_means(model, name, texts):
    """(texts, d) each text's mean input of module `name` over its tokens (no padding)."""
    return torch.stack([token_inputs(model, name, [text]).mean(0) for text in texts])


def test_the_gate_and_the_spare_neuron_equal_their_formulas_on_explicit_tokens(model,
                                                                              statistics):
    from modhifi.text.forget import topic_gates

    layer = transformer_layers(model)[-1]
    texts = [TEXTS[i] for i in statistics.texts]  # every text, in calibration order
    x = text_means(model, layer.ffn_up, texts)       # (40, 32)
    h = text_means(model, layer.ffn_norm, texts)     # (40, 32)
    forget = torch.tensor([tiny_corpus().calibration.labels[i] == 1 for i in statistics.texts])
    m = x.mean(0)
    covariance = (x - m).T @ (x - m) / len(x)
    v = torch.linalg.solve(covariance + 0.5 * covariance.diagonal().mean() * torch.eye(32),
                           x[forget].mean(0) - m)
    v = v / ((x[forget].mean(0) - m) @ v)
    scores = (token_inputs(model, layer.ffn_up, texts) - m) @ v  # every reference token
    gates = topic_gates(statistics, quantiles=(0.3, 0.8), ridge=0.5)
    for gate, q in zip(gates, (0.3, 0.8)):
        assert torch.allclose(gate.reading, v, rtol=1e-5, atol=1e-7)
        assert float(gate.threshold) == pytest.approx(float(scores.quantile(q)), abs=1e-5)
        assert float(gate.scale) == pytest.approx(float(scores.std()), rel=1e-5)
        assert torch.allclose(gate.shift, h[forget].mean(0) - h.mean(0), atol=1e-6)
    # The spare neuron: replacing it by its mean changes the stream least, per token.
    a = token_inputs(model, layer.ffn_down, texts)   # (tokens, 48)
    W = model.get_submodule(layer.ffn_down).weight.double()  # (32, 48)
    change = [((a[:, i:i + 1] - a[:, i].mean()) * W[:, i]).square().sum(1).mean()
              for i in range(48)]
    assert statistics.spare == int(torch.stack(change).argmin())
    assert statistics.spare_mean == pytest.approx(float(a[:, statistics.spare].mean()), abs=1e-6)


def test_the_replayed_edit_equals_the_edited_model_and_the_input_is_untouched(model, statistics):
    """Each strength's replay is the edited model's embeddings; at strength 0 the edit is the
    dense model with the spare neuron held at its mean (a masked dense forward)."""
    from modhifi.text.forget import apply_plan, plan_for, topic_gates

    before = copy.deepcopy(model.state_dict())
    gate, = topic_gates(statistics, quantiles=(0.5,))
    texts = [TEXTS[i] for i in statistics.texts]
    every = torch.ones_like(statistics.forget)
    for strength in (0.0, 1.7):
        edited = apply_plan(model, plan_for(statistics, 1, gate, strength, 0.0))
        expected = embed(edited, texts, device="cpu")
        assert torch.allclose(statistics.edited_embeddings(gate, strength, every), expected,
                              atol=1e-5)
    layer = transformer_layers(model)[-1]

    def hold(module, args):
        a = args[0].clone()
        a[..., statistics.spare] = statistics.spare_mean
        return (a,)

    masked = copy.deepcopy(model)
    masked.get_submodule(layer.ffn_down).register_forward_pre_hook(hold)
    edited = apply_plan(model, plan_for(statistics, 1, gate, 0.0, 0.0))
    assert torch.allclose(embed(edited, TEXTS, device="cpu"), embed(masked, TEXTS, device="cpu"),
                          atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_audit_of_an_edit_replays_the_last_ffn_as_full_passes_would_give(model, statistics):
    """`forget_category` audits the edited encoder from the last FFN's inputs recorded on the
    dense one: its embeddings equal the edited encoder's full passes (a strong edit, so that
    they differ from the dense ones), the statistics read from the whole split's recording equal
    one pass over the texts they use, and the audits equal `audit_text`'s from full passes."""
    from modhifi.audit import AUDIT_FIGURES
    from modhifi.text.encoder import embed_from, record_last_ffn
    from modhifi.text.forget import (apply_plan, audit_text, forget_category, plan_for,
                                     topic_gates, topic_statistics)
    from modhifi.text.quality import train_probe

    recorded = record_last_ffn(model, TEXTS, device="cpu", batch_size=4)  # several batches
    assert torch.equal(recorded.embeddings, embed(model, TEXTS, device="cpu", batch_size=4))
    gate, = topic_gates(statistics, quantiles=(0.5,))
    edited = apply_plan(model, plan_for(statistics, 1, gate, 5.0, 0.0))
    full = embed(edited, TEXTS, device="cpu")
    assert (full - recorded.embeddings).abs().max() > 1e-2
    torch.testing.assert_close(embed_from(edited, recorded), full, rtol=1e-5, atol=1e-6)
    corpus = tiny_corpus()
    # the statistics from the whole split's recording (other batches) are the own pass's
    whole = record_last_ffn(model, corpus.calibration.texts, device="cpu", batch_size=3)
    from_whole = topic_statistics(model, corpus.calibration, category=1, device="cpu",
                                  reference_texts=None, folds=2, recorded=whole)
    for field in ("inputs", "activations", "streams", "embeddings", "fold"):
        torch.testing.assert_close(getattr(from_whole, field), getattr(statistics, field))
    assert (from_whole.spare, from_whole.texts) == (statistics.spare, statistics.texts)
    every = torch.ones_like(statistics.forget)
    torch.testing.assert_close(from_whole.edited_embeddings(gate, 5.0, every),
                               statistics.edited_embeddings(gate, 5.0, every))
    probe = train_probe(embed(model, TEXTS, device="cpu"), corpus.train.labels, corpus.categories)
    result = forget_category(model, probe, corpus, category=1, device="cpu", quantile=0.5,
                             strength=2.0, reference_texts=None)
    for audited, audit in ((model, result.before), (result.model, result.after)):
        by_full_passes = audit_text(audited, probe, corpus, category=1, device="cpu")
        flat = [[*figures.per_class, *(getattr(figures, key) for key in AUDIT_FIGURES)]
                for figures in (audit, by_full_passes)]
        assert flat[0] == pytest.approx(flat[1], abs=1e-6)
    assert result.after.forget_accuracy < result.before.forget_accuracy


def test_the_cross_fitted_figures_equal_each_fold_edited_with_the_others_gate(model, statistics):
    """The strength is judged on texts each edit's gate was not fitted on: the plan's calibration
    figures (forget accuracy, other texts' predictions unchanged) equal editing the real model
    once per fold."""
    from modhifi.text.forget import apply_plan, plan_for, plan_forgetting, topic_gates
    from modhifi.text.quality import train_probe
    from modhifi.unlearn.direction import Gate

    corpus = tiny_corpus()
    probe = train_probe(embed(model, TEXTS, device="cpu"), corpus.train.labels, corpus.categories)
    plan = plan_forgetting(statistics, probe, category=1, quantile=0.5, strength=2.0)
    folds, = topic_gates(statistics, quantiles=(0.5,), cross_fitted=True)
    hits = kept = 0
    others = statistics.reference & ~statistics.forget
    for j in range(2):
        fold = Gate(0.5, *(t[j] for t in (folds.reading, folds.centre, folds.threshold,
                                                  folds.scale, folds.shift)))
        edited = apply_plan(model, plan_for(statistics, 1, fold, 2.0, 0.0))
        for rows, count in ((statistics.forget, "hits"), (others, "kept")):
            index = (rows & (statistics.fold == j)).nonzero()[:, 0]
            texts = [TEXTS[statistics.texts[i]] for i in index]
            predicted = probe.predict(embed(edited, texts, device="cpu"))
            if count == "hits":
                hits += int((predicted == 1).sum())
            else:
                kept += int((predicted == probe.predict(statistics.embeddings[index])).sum())
    assert plan.strength == 2.0 and plan.gate.quantile == 0.5
    assert plan.calibration_forget_accuracy == pytest.approx(hits / int(statistics.forget.sum()))
    assert plan.calibration_retain_agreement == pytest.approx(kept / int(others.sum()))


def test_cli_forgets_a_category_of_a_local_folder_and_the_output_reloads(tiny, tmp_path,
                                                                          capsys, monkeypatch):
    out = tmp_path / "forgot"
    done = cli(capsys, "unlearn", "--model", str(tiny), "--forget-class", "computers",
               "--json", "--out", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["forget_class"] == 1 and result["forget_category"] == "computers"
    assert result["forget_accuracy_after"] <= result["forget_accuracy_before"]
    for key in ("retain_accuracy_after", "mia_after", "probe_accuracy_after", "strength",
                "gate_neuron", "gate_quantile"):
        assert key in result
    monkeypatch.chdir(tmp_path)  # the folder names its base so that it opens from anywhere
    assert json.loads((out / "config.json").read_text())["modhifi_base"] == str(tiny.resolve())
    info = cli(capsys, "info", "--model", str(out), "--json")
    assert info.returncode == 0, info.stderr
    per_class = json.loads(info.stdout)["per_class_accuracy"]
    assert per_class["computers"] == pytest.approx(result["forget_accuracy_after"])


@pytest.mark.parametrize("args, message", [
    (["--forget-class", "nosuch"], "no class 'nosuch'"),
    (["--forget-class", "0", "--forget-target", "2"], "--forget-target"),
])
def test_cli_unlearn_bad_input_on_a_text_model_is_one_line_and_exit_2(tiny, args, message,
                                                                     capsys):
    code, lines = refused(capsys, "unlearn", "--model", str(tiny), *args)
    assert code == 2 and len(lines) == 1 and message in lines[0], lines


def test_cli_scores_of_a_text_model_with_a_forget_class_give_each_neurons_contrast(tiny,
                                                                                  tmp_path,
                                                                                  capsys):
    """The forget-class column is each last-layer neuron's contrast (the library's, on the same
    statistics), and empty elsewhere."""
    import pandas as pd

    from modhifi.text.forget import contrast, topic_statistics

    out = tmp_path / "scores.csv"
    done = cli(capsys, "scores", "--model", str(tiny), "--forget-class", "art",
               "--calib-samples", "64", "--out", str(out))
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(out)
    model = load_encoder(str(tiny), device="cpu")
    statistics = topic_statistics(model, load_fortunes().calibration, category=0, device="cpu")
    layer = statistics.layer.ffn_down
    last = table[table["layer"] == layer]
    expected = contrast(statistics)[torch.tensor(last["in_channel"].to_numpy())]
    assert torch.allclose(torch.tensor(last["forget_contrast"].to_numpy()), expected, rtol=1e-5,
                          atol=1e-9)
    assert table.loc[table["layer"] != layer, "forget_contrast"].isna().all()


def _ffn_ms(neurons):
    return 0.01 * neurons + 0.2


def _heads_ms(heads):
    return 0.3 * heads + 0.1


DENSE_MS = 4.0  # the synthetic encoder's time: its blocks' times are 0.7-1.3 ms


def _synthetic_text_costs(costs):
    """`costs` with a 4 ms encoder and block times linear in the components kept."""
    import dataclasses

    return dataclasses.replace(
        costs, dense_ms=DENSE_MS,
        ffn=dataclasses.replace(costs.ffn, ms=(tuple(map(_ffn_ms, costs.ffn.out_widths)),)),
        heads=dataclasses.replace(costs.heads, ms=(tuple(map(_heads_ms, (1, 2, 3, 4))),)))


def _explicit_text_ms(pruned, kind):
    """The synthetic time of a pruned encoder from the widths its layers really have."""
    saving = 0.0
    for layer in transformer_layers(pruned):
        if kind == "ffn":
            saving += _ffn_ms(48) - _ffn_ms(pruned.get_submodule(layer.ffn_up).out_features)
        else:
            heads = pruned.get_submodule(layer.query).out_features // layer.head_size
            saving += _heads_ms(4) - _heads_ms(heads)
    return DENSE_MS - saving


@pytest.fixture(scope="module")
def text_costs(model, cpu):
    from modhifi.text.latency import measure_text_costs

    state = torch.random.get_rng_state()
    costs = measure_text_costs(model, TEXTS, backend=cpu, batch_size=8)
    # its blocks and inputs come from generators of their own (`Backend.build`, `random`)
    assert torch.equal(torch.random.get_rng_state(), state)
    return costs


def test_a_text_latency_plan_predicts_each_layers_saving_from_its_real_widths(
        model, analysis, text_costs):
    """The cost model times one FFN and one attention block at candidate counts on the timing
    batches; with synthetic block times (linear in the count) a plan's predicted time is the
    dense time less each layer's saving at the widths the pruned encoder really has."""
    from modhifi.prune.latency import candidate_widths
    from modhifi.text.latency import TextCosts

    costs = text_costs
    assert costs.ffn.out_widths == candidate_widths(48) and costs.heads.out_widths == (1, 2, 3, 4)
    assert costs.shapes == tuple(tuple(f["input_ids"].shape) for _, f in token_batches(
        model, TEXTS[:16], batch_size=8, device="cpu"))
    assert min(costs.ffn.ms[0] + costs.heads.ms[0]) > 0 and costs.dense_ms > 0
    assert TextCosts.from_json(costs.to_json()) == costs
    synthetic = _synthetic_text_costs(costs)
    for kind, target in (("ffn", 0.05), ("heads", 0.1)):
        plan = analysis.plan(target, kind=kind, target_kind="latency", costs=synthetic)
        assert plan.latency_after_ms == pytest.approx(
            _explicit_text_ms(apply_plan(analysis, plan), kind))
        assert 1 - plan.latency_after_ms / DENSE_MS >= target and plan.speedup_planned > 1
    with pytest.raises(UserError, match="latency target needs"):
        analysis.plan(0.1, target_kind="latency")


def test_a_cached_text_cost_model_timed_on_other_batches_is_measured_again(
        model, text_costs, cpu, tmp_path, monkeypatch):
    """The file's name does not say which texts were timed (another corpus, another
    tokenizer's lengths): it is read only where its batches' shapes are the timing batches', and
    the progress line says which happened."""
    import dataclasses

    from modhifi.text.latency import measured_text_costs

    path = tmp_path / "encoder.latency.json"
    path.write_text(text_costs.to_json())
    measured, lines = [], []
    monkeypatch.setattr("modhifi.text.latency.measure_text_costs",
                        lambda *a, **k: measured.append(1) or text_costs)
    assert measured_text_costs(model, TEXTS, backend=cpu, batch_size=8, cache=path,
                               progress=lines.append) == text_costs
    assert not measured  # the same batches: read
    assert lines == [f"latency cost model: read from {path}"]
    other = dataclasses.replace(text_costs, shapes=((8, 3), (8, 5)))
    path.write_text(other.to_json())
    lines.clear()
    assert measured_text_costs(model, TEXTS, backend=cpu, batch_size=8, cache=path,
                               progress=lines.append) == text_costs
    assert measured == [1] and path.read_text() == text_costs.to_json()  # measured, replaced
    assert lines == [f"latency cost model: timing one FFN and one attention block, kept in {path}"]


@pytest.mark.parametrize("kind", ["ffn", "heads"])
def test_a_text_latency_target_holds_when_the_encoder_is_slower_than_planned(
        analysis, text_costs, cpu, kind, monkeypatch):
    """A fake clock: every pruned encoder runs 10% slower than the synthetic cost model says
    (its time from its real widths). The first cut falls short; each next plan asks for what the
    last one predicted plus the shortfall, until the measured share meets the target."""
    from modhifi.prune.hold import TOLERANCE
    from modhifi.text.hold import hold_text_latency

    synthetic, target = _synthetic_text_costs(text_costs), 0.1

    def slow(pruned):
        return 1.1 * _explicit_text_ms(pruned, kind)

    def fake(models, texts, *, backend, batch_size, batches):  # sentences per second
        assert batch_size == 8 and list(texts) == TEXTS
        dense, pruned = models
        return [1e3 / DENSE_MS, 1e3 / slow(pruned)]

    monkeypatch.setattr("modhifi.text.hold.sentences_per_second", fake)
    options = {"kind": kind, "costs": synthetic, "texts": TEXTS, "backend": cpu}
    with pytest.raises(UserError, match="measured at batch 8"):
        hold_text_latency(analysis, target, batch_size=64, **options)
    held = hold_text_latency(analysis, target, batch_size=8, **options)
    assert len(held.asked) >= 2 and held.asked[0] == target
    assert held.removed >= target - TOLERANCE
    assert held.removed == pytest.approx(1 - slow(held.model) / DENSE_MS)
    assert held.planned == pytest.approx(1 - _explicit_text_ms(held.model, kind) / DENSE_MS)
    assert held.plan.target == held.asked[-1]
    for before, after in zip(held.asked, held.asked[1:]):
        first = apply_plan(analysis, analysis.plan(before, kind=kind, target_kind="latency",
                                                   costs=synthetic))
        planned = 1 - _explicit_text_ms(first, kind) / DENSE_MS
        assert after == pytest.approx(planned + target - (1 - slow(first) / DENSE_MS))
