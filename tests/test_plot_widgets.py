import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from utils import plot, widgets  # noqa: E402
from utils.energy import summarize_logits  # noqa: E402
from utils.models import build_model  # noqa: E402
from utils.train import History, EpochRecord  # noqa: E402


@pytest.fixture(autouse=True)
def _no_show(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("plot helpers must not call plt.show()")

    monkeypatch.setattr(plt, "show", refuse)
    yield
    plt.close("all")


def test_plot_helpers_return_figure_and_axes():
    x = torch.rand(5, 1, 28, 28)
    fig, axes = plot.show_images(x, [str(i) for i in range(5)], ncols=3)
    assert axes.shape == (2, 3) and axes[0, 1].get_title() == "1"
    fig, axes = plot.show_perturbations(x[:2], (x[:2] + 0.1).clamp(0, 1), [1, 2], [1, 3], labels=[1, 2])
    assert axes.shape == (3, 2)
    assert axes[2, 1].title.get_color() == "crimson" and axes[2, 0].title.get_color() == "black"
    fig, ax = plot.plot_confusion(torch.eye(10, dtype=torch.long) * 5)
    assert ax.get_xlabel() == "predicted"
    fig, ax = plot.plot_curves([0, 0.1, 0.2], {"a": [1, 0.5, 0.1], "b": [1, 0.9, 0.8]}, xlabel="ε", ylabel="acc")
    assert len(ax.get_lines()) == 2
    fig, ax = plot.plot_histograms({"clean": torch.randn(100), "noisy": torch.randn(100) + 2}, xlabel="E")
    assert len(ax.patches) > 0
    fig, axes = plot.plot_logit_summary(summarize_logits([2.0, 1.0, 0.1]))
    assert "-2.4170" in fig._suptitle.get_text()
    hist = History([EpochRecord(1, 1.0, 0.5, 0.9, 0.6, 1.0, 1e-3, {}), EpochRecord(2, 0.5, 0.8, 0.6, 0.7, 1.0, 1e-3, {})])
    fig, axes = plot.plot_history(hist)
    assert len(axes[1].get_lines()) == 2


def test_plot_helpers_reject_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        plot.show_images(torch.zeros(0, 1, 28, 28))
    with pytest.raises(ValueError, match="same shape"):
        plot.show_perturbations(torch.zeros(2, 1, 28, 28), torch.zeros(3, 1, 28, 28), [0, 0], [0, 0])


def test_logit_explorer_redraws_from_the_pure_function(monkeypatch):
    seen = []
    real = widgets.summarize_logits
    monkeypatch.setattr(widgets, "summarize_logits", lambda v, T: seen.append((tuple(v), T)) or real(v, T))
    box = widgets.logit_explorer((2.0, 1.0, 0.1))
    controls = box.children[0].children
    assert len(controls) == 5  # three logit sliders, T, the shift button
    assert seen[-1] == ((2.0, 1.0, 0.1), 1.0)
    controls[1].value = 3.0
    assert seen[-1][0] == (2.0, 3.0, 0.1)
    controls[4].click()  # add 1 to every logit
    assert seen[-1][0] == pytest.approx((3.0, 4.0, 1.1))


def test_perturbation_explorer_calls_the_chosen_method():
    model = build_model("mlp", hidden=8).eval()
    x, y = torch.rand(3, 1, 28, 28), torch.tensor([0, 1, 2])
    calls = []

    def noise(m, xb, yb, eps):
        calls.append(("noise", len(xb), eps))
        return (xb + eps).clamp(0, 1)

    box = widgets.perturbation_explorer(model, x, y, {"noise": noise}, eps=0.2)
    index, method, size = box.children[0].children
    size.value = 0.3
    index.value = 2
    assert calls[0] == ("noise", 1, 0.2) and calls[-1] == ("noise", 1, 0.3)
    with pytest.raises(ValueError, match="at least one"):
        widgets.perturbation_explorer(model, x, y, {})


def test_attack_explorer_passes_sliders_and_targets_to_the_attack():
    model = build_model("mlp", hidden=8).eval()
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    calls = []

    def attack(m, xb, yb, eps=0.0, steps=1, targeted=False):
        calls.append((int(yb[0]), eps, steps, targeted))
        return (xb + eps).clamp(0, 1)

    box = widgets.attack_explorer(model, x, y, attack, sliders={"eps": (0.0, 0.5, 0.01, 0.1), "steps": (1, 50, 1, 5)})
    assert calls[-1] == (0, 0.1, 5, False)
    index, eps, steps = box.children[0].children
    (goal,) = box.children[1].children
    assert isinstance(steps.value, int)
    eps.value = 0.2
    index.value = 3
    assert calls[-1] == (3, 0.2, 5, False)
    goal.value = 7
    assert calls[-1] == (7, 0.2, 5, True)
    case = widgets.run_attack_case(model, x, y, attack, 1, eps=0.3)
    assert case.label == 1 and case.target is None and 0.29 < case.linf <= 0.3 + 1e-6
    assert case.success == (case.pred_adv != 1)
    targeted_case = widgets.run_attack_case(model, x, y, attack, 1, target=4, eps=0.0)
    assert targeted_case.target == 4 and targeted_case.success == (targeted_case.pred_adv == 4)
    with pytest.raises(ValueError, match="index"):
        widgets.run_attack_case(model, x, y, attack, 9)


# --- the kernel-free explorer ---------------------------------------------------------------

def _stacks_by_level(box):
    """The Stack widgets of a frame explorer, grouped by depth (level 0 is the outermost)."""
    import ipywidgets as W

    levels, current = [], [box.children[1]]
    while current and isinstance(current[0], W.Stack):
        levels.append(current)
        current = [child for stack in current for child in stack.children]
    return levels, current


def test_frame_explorer_draws_every_combination_once_and_links_each_slider_to_its_level():
    calls = []

    def render(a, b):
        calls.append((a, b))
        fig, ax = plt.subplots(figsize=(1, 1))
        ax.set_title(f"{a}/{b}")
        return fig, f"a={a} b={b}"

    box = widgets.frame_explorer(render, {"a": [1, 2, 3], "b": [("low", 0.1), ("high", 0.9)]}, initial={"b": 0.9})
    assert sorted(calls) == sorted((a, b) for a in (1, 2, 3) for b in (0.1, 0.9)), "each frame drawn exactly once"
    assert box.frame_count == 6 and "book-explorer" in box._dom_classes
    sliders = box.children[0].children
    assert [s.description for s in sliders] == ["a", "b"] and list(sliders[1].options) == ["low", "high"]
    assert sliders[1].index == 1, "initial picks the starting value"
    levels, leaves = _stacks_by_level(box)
    assert [len(level) for level in levels] == [1, 3] and len(leaves) == 6
    assert all(stack.selected_index == 1 for stack in levels[1])
    # every stack of level k is jslinked to slider k's index, and nothing else is linked
    linked = {(id(link.source[0]), link.source[1], id(link.target[0]), link.target[1]) for link in box.links}
    expected = {(id(sliders[k]), "index", id(stack), "selected_index") for k, level in enumerate(levels) for stack in level}
    assert linked == expected
    # leaf i*2+j shows frame (a_i, b_j): its caption says so, and its image is a PNG
    for i, a in enumerate((1, 2, 3)):
        for j, b in enumerate((0.1, 0.9)):
            caption, image = levels[1][i].children[j].children
            assert caption.value == f"a={a} b={b}" and image.value[:8] == b"\x89PNG\r\n\x1a\n"


def test_frame_explorer_refuses_what_it_cannot_show():
    def render(**_):
        return plt.subplots()[0]

    with pytest.raises(ValueError, match="MAX_FRAMES"):
        widgets.frame_explorer(render, {"a": range(20), "b": range(20)})
    with pytest.raises(ValueError, match="not one of"):
        widgets.frame_explorer(render, {"a": [1, 2]}, initial={"a": 3})
    with pytest.raises(ValueError, match="unknown control"):
        widgets.frame_explorer(render, {"a": [1, 2]}, initial={"z": 1})
    with pytest.raises(ValueError, match="labels"):
        widgets.frame_explorer(render, {"a": [("x", 1), ("x", 2)]})
    with pytest.raises(ValueError, match="at least one"):
        widgets.frame_explorer(render, {})


def test_attack_frames_attack_the_chosen_digit_towards_the_chosen_goal():
    seen = []

    def attack(model, x, y, *, eps, targeted=False):
        seen.append((float(x.sum()), int(y), eps, targeted))
        return (x + eps).clamp(0, 1)

    model = build_model("mlp", hidden=8)
    x = torch.rand(3, 1, 28, 28)
    y = torch.tensor([1, 2, 3])
    render = widgets.attack_frames(model, x, y, attack, goal_key="goal")
    fig, text = render(digit=2, goal=7, eps=0.25)
    assert seen == [(float(x[2].sum()), 7, 0.25, True)]
    assert text.startswith("target 7") and len(fig.axes) == 3
    plt.close(fig)
    fig, text = render(digit=0, goal=None, eps=0.0)
    assert seen[-1] == (float(x[0].sum()), 1, 0.0, False) and text.startswith("untargeted")
    plt.close(fig)


def test_logit_frames_shift_moves_the_energy_not_the_softmax():
    render = widgets.logit_frames((2.0, 1.0, 0.1))
    energies = []
    for shift in (0.0, 3.0):
        fig, text = render(shift=shift, T=1.0)
        energies.append(float(text.split("<b>")[1].split("</b>")[0]))
        plt.close(fig)
    assert energies[1] == pytest.approx(energies[0] - 3.0, abs=0.01)


def test_figures_fit_the_content_column():
    """Grids of digits are drawn at most plot.MAX_WIDTH inches wide, whatever the panel size asked."""
    fig, _ = plot.show_images(torch.rand(24, 1, 28, 28), ncols=12, size=1.2)
    assert fig.get_figwidth() <= plot.MAX_WIDTH + 1e-9
    plt.close(fig)
    x = torch.rand(10, 1, 28, 28)
    fig, _ = plot.show_perturbations(x, x, torch.zeros(10), torch.zeros(10), size=2.0)
    assert fig.get_figwidth() <= plot.MAX_WIDTH + 1e-9
    plt.close(fig)


def test_models_attack_frames_attack_the_chosen_model():
    seen = []

    def attack(model, x, y, *, eps):
        seen.append((model.tag, eps))
        return x

    a, b = build_model("mlp", hidden=8), build_model("mlp", hidden=8)
    a.tag, b.tag = "a", "b"
    render = widgets.models_attack_frames({"first": a, "second": b}, torch.rand(2, 1, 28, 28), torch.tensor([0, 1]), attack)
    fig, text = render(model="second", digit=1, eps=0.3)
    assert seen == [("b", 0.3)] and fig._suptitle.get_text() == "second: eps = 0.3"
    plt.close(fig)
    with pytest.raises(ValueError, match="unknown model"):
        render(model="third", digit=0, eps=0.1)
