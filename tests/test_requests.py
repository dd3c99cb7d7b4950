"""Requests (modhifi.requests): equal by value, hashable, checked on construction with one-line
errors, their defaults the library's, their keyword arguments accepted by the library calls."""
import inspect

import pytest

from modhifi.errors import UserError
from modhifi.options import default_compensation
from modhifi.requests import ModelRef, PruneRequest, UnlearnRequest


def one_line_error(make) -> str:
    with pytest.raises(UserError) as caught:
        make()
    message = str(caught.value)
    assert message and "\n" not in message
    return message


@pytest.mark.parametrize("make", [
    lambda: ModelRef("digits-cnn"),
    lambda: ModelRef("model.pt", arch="resnet18", data="cifar10:/data/cifar"),
    lambda: PruneRequest(target=0.5, target_kind="macs", method="l1"),
    lambda: UnlearnRequest(forget_class=3, k=0.03, edit="negate"),
])
def test_requests_are_equal_by_value_and_hashable(make):
    first, second = make(), make()
    assert first is not second and first == second and hash(first) == hash(second)
    assert len({first, second}) == 1
    with pytest.raises(AttributeError):  # frozen: a cache key cannot change under the cache
        first.__setattr__("seed" if not isinstance(first, ModelRef) else "spec", 1)


def test_different_values_are_different_keys():
    assert PruneRequest(target=0.5) != PruneRequest(target=0.6)
    assert PruneRequest(target=0.5) != PruneRequest(target=0.5, recalibrate=False)
    assert UnlearnRequest(forget_class=1) != UnlearnRequest(forget_class=2)
    assert ModelRef("a.pt", data="digits") != ModelRef("a.pt", data="fashion-mnist")


def test_equal_meaning_is_equal_value():
    assert PruneRequest(target=0) == PruneRequest(target=0.0)
    for method in ("modhifi", "l1"):  # the default compensation is spelled out on construction
        implicit = PruneRequest(target=0.5, method=method)
        assert implicit.compensation == default_compensation(method)
        assert implicit == PruneRequest(target=0.5, method=method,
                                        compensation=default_compensation(method))
    assert ModelRef("a.pt", arch="", data="digits") == ModelRef("a.pt", data="digits")


@pytest.mark.parametrize("ref", [
    ModelRef("digits-cnn"),
    ModelRef("/models/my model.pt", arch="resnet18", data="imagefolder:/data/x"),
    ModelRef("pruned.pt", data="digits"),
    ModelRef("plain.pt", arch="vgg11"),
])
def test_a_model_ref_round_trips_through_its_string(ref):
    assert ModelRef.parse(str(ref)) == ref


def test_the_string_form_of_a_model_ref():
    assert str(ModelRef("digits-cnn")) == "digits-cnn"
    assert str(ModelRef("a.pt", arch="resnet18", data="digits")) == "a.pt|resnet18|digits"
    assert ModelRef.parse("a.pt||digits") == ModelRef("a.pt", data="digits")


@pytest.mark.parametrize("text, words", [
    ("a.pt|resnet18", "neither a name nor PATH|ARCH|DATA"),
    ("a|b|c|d", "neither a name nor PATH|ARCH|DATA"),
    ("", "names no model"),
    ("|resnet18|digits", "names no model"),
])
def test_a_bad_model_string_is_one_line_naming_the_fix(text, words):
    message = one_line_error(lambda: ModelRef.parse(text))
    assert words in message and "zoo name" in message  # the problem, and the fix


@pytest.mark.parametrize("make, words", [
    (lambda: PruneRequest(target=1.0), "target 1.0 must be in [0, 1)"),
    (lambda: PruneRequest(target=-0.1), "target -0.1"),
    (lambda: PruneRequest(target=0.5, method="magnitude"), "unknown method 'magnitude'"),
    (lambda: PruneRequest(target=0.5, target_kind="flops"), "unknown target kind"),
    (lambda: PruneRequest(target=0.5, allocation="local"), "unknown allocation"),
    (lambda: PruneRequest(target=0.5, scope="some"), "unknown scope"),
    (lambda: PruneRequest(target=0.5, compensation="magic"), "unknown compensation"),
    (lambda: PruneRequest(target=0.5, round_to=0), "round_to 0 must be at least 1"),
    (lambda: PruneRequest(target=0.5, round_to=2.5), "round_to 2.5"),
    (lambda: PruneRequest(target=0.5, floor=1.5), "floor 1.5 is out of range: pass a fraction in [0, 1]"),
    (lambda: PruneRequest(target=0.5, seed=-1), "seed -1"),
    (lambda: PruneRequest(target=0.5, recalibrate="yes"), "recalibrate 'yes'"),
    (lambda: UnlearnRequest(forget_class=-1), "forget class -1"),
    (lambda: UnlearnRequest(forget_class=True), "forget class True"),
    (lambda: UnlearnRequest(forget_class=1, edit="erase"), "unknown edit 'erase'"),
    (lambda: UnlearnRequest(forget_class=1, layers=0), "layers 0 must be at least 1"),
    (lambda: UnlearnRequest(forget_class=1, k=0), "k 0 is out of range: pass a fraction in (0, 1]"),
    (lambda: UnlearnRequest(forget_class=1, k=1.5), "k 1.5"),
    (lambda: UnlearnRequest(forget_class=1, score="raw"), "unknown score 'raw'"),
    (lambda: UnlearnRequest(forget_class=1, target_forget_accuracy=2), "target forget accuracy 2"),
    (lambda: UnlearnRequest(forget_class=1, retain_samples=0), "retain samples 0"),
    (lambda: UnlearnRequest(forget_class=1, batch_size=0), "batch size 0"),
    (lambda: PruneRequest(target=0.5, overrides=(("3", 1.5),)), "override of 3 1.5"),
    (lambda: ModelRef("a.pt", arch="res|net", data="digits"), "model arch 'res|net'"),
])
def test_a_bad_value_is_refused_in_one_line(make, words):
    assert words in one_line_error(make)


def test_options_are_keyword_only():
    with pytest.raises(TypeError):
        PruneRequest(0.5)
    with pytest.raises(TypeError):
        UnlearnRequest(3)
    with pytest.raises(TypeError):
        ModelRef("a.pt", "resnet18", "digits")


def _defaults(function) -> dict:
    return {name: p.default for name, p in inspect.signature(function).parameters.items()
            if p.default is not inspect.Parameter.empty}


def test_the_defaults_are_the_librarys():
    """A request left at its defaults asks for what the library call does by default."""
    from modhifi.prune import Analysis
    from modhifi.unlearn import unlearn

    prune = PruneRequest(target=0.5)
    library = {**_defaults(Analysis.plan), **_defaults(Analysis.apply)}
    for name, value in {**prune.plan_kwargs(), **prune.apply_kwargs()}.items():
        if name != "target":
            assert value == library[name], name
    library = _defaults(unlearn)
    for name, value in UnlearnRequest(forget_class=0).kwargs().items():
        if name != "forget_class":
            assert value == library[name], name


def test_the_keyword_arguments_name_the_library_calls_parameters():
    from modhifi.prune import Analysis
    from modhifi.unlearn import unlearn
    from modhifi.zoo import open_subject

    request = PruneRequest(target=0.5)
    assert set(request.plan_kwargs()) <= set(inspect.signature(Analysis.plan).parameters)
    assert set(request.apply_kwargs()) <= set(inspect.signature(Analysis.apply).parameters)
    assert set(UnlearnRequest(forget_class=0).kwargs()) <= set(inspect.signature(unlearn).parameters)
    assert set(ModelRef("x").open_kwargs()) <= set(inspect.signature(open_subject).parameters)


def test_a_request_drives_the_library(cpu):
    """The plan and pruned model from a request equal those from the spelled-out call."""
    from conftest import subject

    from modhifi import bench

    chosen = subject("digits-cnn")
    study = bench.live_analysis(chosen.loaded.model, chosen.dataset, backend=cpu, samples=250)
    request = PruneRequest(target=0.4, target_kind="macs", method="l1", round_to=1)
    assert study.plan(**request.plan_kwargs()) == study.plan(0.4, target_kind="macs", method="l1",
                                                             round_to=1)


def test_a_text_requests_command_line_asks_the_command_line_for_the_same():
    """The pages' "save it with" lines: parsed by the command line's own parser, every option is
    the request's (the page's calibration size too), and the checks pass."""
    from modhifi.arguments import build_parser, check_arguments
    from modhifi.requests import TextPruneRequest, TextUnlearnRequest

    def parsed(command: str):
        words = command.split()
        assert words[:3] == ["python", "-m", "modhifi"]
        args = build_parser().parse_args(words[3:])
        check_arguments(args)
        return args

    prune = TextPruneRequest(target=0.35, components="heads", target_kind="macs",
                             method="activation", compensation="rescale")
    args = parsed(prune.command("minilm-l6", 250))
    assert (args.model, args.target, args.components, args.target_kind, args.method,
            args.compensation, args.calib_samples) == (
        "minilm-l6", 0.35, "heads", "macs", "activation", "rescale", 250)
    args = parsed(TextUnlearnRequest(category=2, target=0.05).command("minilm-l6", "definitions"))
    assert (args.command, args.forget_class, args.forget_target) == (
        "unlearn", "definitions", 0.05)
