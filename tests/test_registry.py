"""The registry: entry-point discovery, hand registration, broken plugins, and the
messages a user gets for unknown, invalid or incompatible components (docs/architecture.md,
"Components and plugins")."""

from __future__ import annotations

import importlib.metadata as md
import json
import types
import warnings

import pytest
import torch
from torch import nn

import geopeft
from geopeft import cli
from geopeft.kinds import KINDS
from geopeft.registry import get_registry

KIND_BASES = {kind: f"geopeft.{k.base.__name__}" for kind, k in KINDS.items()}
HOOKS = {kind: k.hook for kind, k in KINDS.items()}


def test_kinds_table_is_the_eight_kinds_and_their_hooks():
    assert HOOKS == {
        "adapter": "register_adapters", "manifold": "register_manifolds",
        "gradient_transform": "register_gradient_transforms",
        "rank_controller": "register_rank_controllers",
        "initializer": "register_initializers", "method": "register_methods",
        "target_preset": "register_target_presets", "quantization": "register_quantizations"}
    assert KIND_BASES["method"] == "geopeft.Recipe" and KINDS["method"].instance
    # the hookspecs are generated from the table: one per kind, nothing else
    from geopeft import hookspecs

    specs = {n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), "geopeft_spec")}
    assert specs == set(HOOKS.values())


def _namespace(**hooks) -> types.SimpleNamespace:
    """A plugin object whose attributes are @geopeft.hookimpl functions."""
    return types.SimpleNamespace(**{name: geopeft.hookimpl(fn) for name, fn in hooks.items()})


def _make_manifold(name: str) -> type[geopeft.Manifold]:
    """A fresh (flat) Manifold subclass, so identity checks tell it from the built-ins."""

    class _Flat(geopeft.Manifold):
        is_euclidean = True

        def project_tangent(self, x, u):
            return u

        def retract(self, x, u):
            return x + u

        def project(self, x):
            return x

        def violation(self, x):
            return x.new_zeros(x.shape[:-2])

        def random_point(self, shape, generator=None, dtype=torch.float32):
            return torch.randn(*shape, generator=generator, dtype=dtype)

    _Flat.__name__ = _Flat.__qualname__ = f"Flat_{name}"
    _Flat.name = name
    return _Flat


# --------------------------------------------------------------------------- a three-factor adapter
class USVAdapter(geopeft.Adapter):
    """ΔW = s·U·S·Vᵀ with U (m, r), S (r, r), V (n, r): the smallest U S V adapter
    (a third-party one, registered as "toy_usv" beside the built-in "usv")."""

    factor_names = ("U", "S", "V")
    rank_dims = {"U": (1,), "S": (0, 1), "V": (1,)}
    default_manifolds = {"U": "euclidean", "S": "euclidean", "V": "euclidean"}

    def __init__(self, base, rank, alpha=None, rslora=False, dtype=None):
        super().__init__(base, rank, alpha=alpha, rslora=rslora, dtype=dtype)
        m, n = self.shape
        self.U = nn.Parameter(torch.zeros(m, rank, dtype=self.factor_dtype))
        self.S = nn.Parameter(torch.eye(rank, dtype=self.factor_dtype))
        self.V = nn.Parameter(torch.randn(n, rank, dtype=self.factor_dtype))

    def delta_weight(self):
        return self.ops.to_weight_layout(self.scaling * (self.U @ self.S @ self.V.T), self.base_layer)

    def forward(self, x, base_out):
        h = self.ops.lift(x, self.S @ self.V.T, self.base_layer)
        return base_out + self.scaling * self.ops.lower(h, self.U)

    def to_lora(self):
        return self.U, self.S @ self.V.T


class NoInit(geopeft.Initializer):
    requires = frozenset({"U", "S", "V"})

    def initialize(self, adapters, model=None, batches=None, loss_fn=None):
        pass


def _usv_plugin() -> types.SimpleNamespace:
    return _namespace(
        register_adapters=lambda register: register("toy_usv", USVAdapter),
        register_initializers=lambda register: register("usv_noop", NoInit),
        register_methods=lambda register: register(
            "toy_usv", geopeft.Recipe(name="toy_usv", adapter="toy_usv", initializer="usv_noop")),
    )


# --------------------------------------------------------------------------- built-in and external plugins
def test_builtin_lora_plugin_comes_from_its_entry_point():
    reg = get_registry()
    info = reg.plugins["lora"]
    assert info.distribution == "geopeft"
    assert info.version == geopeft.__version__
    assert info.error is None
    eps = {ep.name: ep.value for ep in md.entry_points(group="geopeft")}
    assert eps["lora"] == "geopeft.plugins.lora"
    assert reg.pm.get_plugin("lora") is __import__("geopeft.plugins.lora", fromlist=["_"])


def test_components_lists_every_kind_with_the_lora_parts():
    comps = geopeft.components()
    assert set(comps) == set(KIND_BASES)
    assert "lora" in comps["adapter"]
    assert "euclidean" in comps["manifold"]
    assert "fixed" in comps["rank_controller"]
    assert "lora" in comps["initializer"]
    assert {"lora", "rslora"} <= set(comps["method"])
    for kind, names in comps.items():
        assert names == sorted(names), kind
    reg = get_registry()
    assert reg.plugin_of("adapter", "lora") == "lora"
    assert reg.plugin_of("method", "rslora") == "lora"
    assert reg.plugins["lora"].components == {"adapter": ["lora"], "method": ["lora", "rslora"]}
    # the recipe's other default parts are core's own
    assert reg.plugins["core"].components == {
        "manifold": ["euclidean"], "rank_controller": ["fixed"], "initializer": ["lora"]}
    assert reg.plugins["core"].distribution == "geopeft"


def test_external_plugin_is_discovered_from_its_entry_point():
    reg = get_registry()
    # found through the entry point, not registered by hand
    eps = {ep.name: ep for ep in md.entry_points(group="geopeft")}
    assert "example" in eps and eps["example"].value == "geopeft_example_plugin"
    info = reg.plugins["example"]
    assert info.distribution == "geopeft-example-plugin"
    assert info.version == md.version("geopeft-example-plugin")
    assert info.error is None
    comps = geopeft.components()
    assert "oblique" in comps["manifold"]
    assert "scaled_gd" in comps["gradient_transform"]
    assert reg.plugin_of("manifold", "oblique") == "example"
    assert reg.plugin_of("gradient_transform", "scaled_gd") == "example"
    assert info.components == {"manifold": ["oblique"], "gradient_transform": ["scaled_gd"]}


def test_external_plugin_components_are_usable(tiny):
    geopeft.adapt(tiny, "lora", targets=["query"], rank=2, manifold={"A": "oblique"},
                  transforms=["scaled_gd"])
    (_, adapter), = geopeft.adapters(tiny)
    assert type(adapter.factor_manifolds()["A"]).__name__ == "ObliqueManifold"
    # adapt() put A on the oblique manifold: unit-norm rows
    torch.testing.assert_close(adapter.A.detach().norm(dim=-1), torch.ones(2))


# --------------------------------------------------------------------------- unknown names
def test_unknown_method_names_closest_and_available(tiny):
    with pytest.raises(geopeft.UnknownComponentError) as info:
        geopeft.adapt(tiny, method="lorra", targets=["query"])
    msg = str(info.value)
    assert "unknown method 'lorra'" in msg
    assert "did you mean 'lora'?" in msg
    assert "available:" in msg
    available = msg.split("available:", 1)[1]
    assert "lora" in available and "rslora" in available
    assert isinstance(info.value, KeyError)  # still a KeyError for callers that catch that
    assert geopeft.adapters(tiny) == []


def test_unknown_manifold_names_closest_and_available(tiny):
    with pytest.raises(geopeft.UnknownComponentError) as info:
        geopeft.adapt(tiny, "lora", targets=["query"], manifold={"A": "oblik"})
    msg = str(info.value)
    assert "unknown manifold 'oblik'" in msg
    assert "did you mean 'oblique'?" in msg
    available = msg.split("available:", 1)[1]
    assert "euclidean" in available and "oblique" in available


def test_unknown_name_far_from_everything_has_no_suggestion(tiny):
    with pytest.raises(geopeft.UnknownComponentError) as info:
        geopeft.adapt(tiny, "lora", targets=["query"], transforms=["zzzzzz"])
    msg = str(info.value)
    assert "unknown gradient transform 'zzzzzz'" in msg
    assert "did you mean" not in msg
    assert "scaled_gd" in msg.split("available: ", 1)[1]  # other plugins may add transforms


# --------------------------------------------------------------------------- hand registration
def test_hand_registered_manifold_becomes_available(unregistered_after, plugin, tiny):
    cls = _make_manifold("handmade")
    plugin(_namespace(register_manifolds=lambda register: register("handmade", cls)), "hand")
    unregistered_after.append(("manifold", "handmade"))
    reg = get_registry()
    assert "handmade" in geopeft.components()["manifold"]
    assert reg.get("manifold", "handmade") is cls
    assert reg.plugin_of("manifold", "handmade") == "hand"
    assert reg.plugins["hand"].components == {"manifold": ["handmade"]}
    assert reg.plugins["hand"].error is None
    geopeft.adapt(tiny, "lora", targets=["query"], rank=2, manifold={"B": "handmade"})
    (_, adapter), = geopeft.adapters(tiny)
    assert isinstance(adapter.factor_manifolds()["B"], cls)
    # the `unregistered_after` fixture checks, after the `plugin` fixture's teardown,
    # that "handmade" is no longer a manifold


def test_unregister_plugin_removes_its_components(tiny):
    reg = get_registry()
    cls = _make_manifold("transient")
    reg.register_plugin(_namespace(register_manifolds=lambda register: register("transient", cls)),
                        "transient-plugin")
    try:
        assert "transient" in geopeft.components()["manifold"]
    finally:
        reg.unregister_plugin("transient-plugin")
    assert "transient" not in geopeft.components()["manifold"]
    assert "transient-plugin" not in reg.plugins
    with pytest.raises(geopeft.UnknownComponentError, match="unknown manifold 'transient'"):
        geopeft.adapt(tiny, "lora", targets=["query"], manifold={"A": "transient"})


# --------------------------------------------------------------------------- broken plugins
def test_plugin_whose_hook_raises_does_not_take_the_others_down(plugin, tiny):
    def boom(register):
        raise RuntimeError("boom: the plugin is broken")

    plugin(_namespace(register_manifolds=boom), "failing")
    reg = get_registry()
    with pytest.warns(RuntimeWarning, match="failing"):
        comps = geopeft.components()
    # the others are still there and work
    assert {"euclidean", "oblique"} <= set(comps["manifold"])
    geopeft.adapt(tiny, "lora", targets=["query"], rank=2)
    assert len(geopeft.adapters(tiny)) == 1
    # the failing plugin says what happened
    error = reg.plugins["failing"].error
    assert error is not None
    assert "register_manifolds" in error
    assert "RuntimeError" in error and "boom: the plugin is broken" in error
    assert reg.plugins["lora"].error is None
    # asking for a component the user expected from it names the failed plugin
    with pytest.raises(geopeft.UnknownComponentError) as info:
        geopeft.adapt(type(tiny)(), "lora", targets=["query"], manifold={"A": "boomfold"})
    msg = str(info.value)
    assert "unknown manifold 'boomfold'" in msg
    assert "failed to load" in msg
    assert "failing" in msg and "boom: the plugin is broken" in msg


@pytest.mark.parametrize("kind", list(KIND_BASES))
def test_registering_a_non_subclass_is_recorded_naming_the_base_class(plugin, kind):
    hook = HOOKS[kind]
    plugin(_namespace(**{hook: lambda register: register("bad_thing", object)}), "badplug")
    reg = get_registry()
    with pytest.warns(RuntimeWarning, match="badplug"):
        names = reg.names(kind)
    assert "bad_thing" not in names
    error = reg.plugins["badplug"].error
    assert error is not None
    assert KIND_BASES[kind] in error
    assert "bad_thing" in error
    assert "object" in error
    assert reg.plugins["lora"].error is None


def test_registering_an_instance_instead_of_a_class_is_refused(plugin):
    cls = _make_manifold("inst")
    plugin(_namespace(register_manifolds=lambda register: register("inst", cls())), "instplug")
    reg = get_registry()
    with pytest.warns(RuntimeWarning):
        assert "inst" not in reg.names("manifold")
    assert "must be a subclass of geopeft.Manifold" in reg.plugins["instplug"].error


def test_duplicate_name_keeps_the_first_and_records_an_error(plugin, tiny):
    reg = get_registry()
    original = reg.get("manifold", "euclidean")
    impostor = _make_manifold("euclidean")
    plugin(_namespace(register_manifolds=lambda register: register("euclidean", impostor)), "dup")
    with pytest.warns(RuntimeWarning, match="already registered"):
        comps = geopeft.components()
    assert comps["manifold"].count("euclidean") == 1
    assert reg.get("manifold", "euclidean") is original
    assert reg.plugin_of("manifold", "euclidean") == "core"
    error = reg.plugins["dup"].error
    assert "'euclidean'" in error
    assert "already registered by plugin 'core'" in error
    assert "keeping that one" in error
    assert reg.plugins["lora"].error is None
    assert "manifold" not in reg.plugins["dup"].components
    geopeft.adapt(tiny, "lora", targets=["query"], rank=2)
    (_, adapter), = geopeft.adapters(tiny)
    assert type(adapter.factor_manifolds()["A"]) is original


def _cleanup_pm(reg, name: str) -> bool:
    """Unregister `name` from the plugin manager if the library left it there; True if it had."""
    left = reg.pm.get_plugin(name) is not None
    if left:
        reg.pm.unregister(name=name)
    reg.plugins.pop(name, None)
    reg._components = None
    return left


def test_hookimpl_matching_no_hookspec_fails_fast_and_leaves_the_registry_clean():
    @geopeft.hookimpl
    def register_manifold(register):  # typo: the hook is register_manifolds
        register("never", object)

    reg = get_registry()
    try:
        with pytest.raises(geopeft.PluginError) as info:
            reg.register_plugin(types.SimpleNamespace(register_manifold=register_manifold), "typo")
    finally:
        left_registered = _cleanup_pm(reg, "typo")
    msg = str(info.value)
    assert "register_manifold" in msg
    assert "Valid hooks:" in msg
    for hook in HOOKS.values():
        assert hook in msg
    # the bad plugin must not stay registered: otherwise every later registration fails too
    assert not left_registered, "register_plugin left the rejected plugin registered"


def test_rejected_plugin_does_not_break_later_registrations(tiny):
    @geopeft.hookimpl
    def register_manifold(register):
        pass

    reg = get_registry()
    good = _make_manifold("after_typo")
    try:
        with pytest.raises(geopeft.PluginError):
            reg.register_plugin(types.SimpleNamespace(register_manifold=register_manifold), "typo2")
        # a correct plugin registered afterwards must work
        reg.register_plugin(_namespace(register_manifolds=lambda register: register("after_typo", good)),
                            "good-after-typo")
        assert reg.get("manifold", "after_typo") is good
    finally:
        _cleanup_pm(reg, "typo2")
        _cleanup_pm(reg, "good-after-typo")


def test_unknown_hook_error_names_the_plugin_by_its_registered_name():
    @geopeft.hookimpl
    def register_manifold(register):
        pass

    reg = get_registry()
    try:
        with pytest.raises(geopeft.PluginError) as info:
            reg.register_plugin(types.SimpleNamespace(register_manifold=register_manifold), "typo3")
    finally:
        _cleanup_pm(reg, "typo3")
    assert "plugin 'typo3'" in str(info.value)


# --------------------------------------------------------------------------- GEOPEFT_PLUGINS and entry points
def test_allow_list_loads_only_the_named_plugins(fresh_registry, monkeypatch, tiny):
    monkeypatch.setenv("GEOPEFT_PLUGINS", "lora")
    reg = get_registry()
    assert set(reg.plugins) == {"core", "lora"}
    comps = geopeft.components()
    assert "oblique" not in comps["manifold"]
    assert "scaled_gd" not in comps["gradient_transform"]
    with pytest.raises(geopeft.UnknownComponentError) as info:
        geopeft.adapt(tiny, "lora", targets=["query"], manifold={"A": "oblique"})
    assert "unknown manifold 'oblique'" in str(info.value)
    assert "available: euclidean" in str(info.value)
    geopeft.adapt(type(tiny)(), "lora", targets=["query"])  # lora itself still works


def test_allow_list_tolerates_spaces_and_empty_items(fresh_registry, monkeypatch):
    monkeypatch.setenv("GEOPEFT_PLUGINS", " example , ,lora ")
    assert set(get_registry().plugins) == {"core", "lora", "example"}


def _with_extra_entry_points(monkeypatch, *extra: md.EntryPoint) -> None:
    """Make registry.py's `md.entry_points(group="geopeft")` also return `extra`."""
    from geopeft import registry

    original = registry.md.entry_points

    def entry_points(**kwargs):
        found = list(original(**kwargs))
        if kwargs.get("group") == "geopeft":
            found += list(extra)
        return found

    monkeypatch.setattr(registry.md, "entry_points", entry_points)


def test_plugin_that_fails_to_import_is_reported_and_the_others_load(fresh_registry, monkeypatch,
                                                                    capsys, tiny):
    _with_extra_entry_points(
        monkeypatch, md.EntryPoint(name="broken", value="geopeft_no_such_module", group="geopeft"))
    with pytest.warns(RuntimeWarning, match="broken.*failed to load.*ModuleNotFoundError"):
        reg = get_registry()
    assert {"lora", "example", "broken"} <= set(reg.plugins)
    error = reg.plugins["broken"].error
    assert error.startswith("ModuleNotFoundError")
    assert "geopeft_no_such_module" in error
    assert reg.plugins["lora"].error is None and reg.plugins["example"].error is None
    comps = geopeft.components()
    assert "oblique" in comps["manifold"] and "lora" in comps["method"]
    geopeft.adapt(tiny, "lora", targets=["query"], manifold={"A": "oblique"})

    # asking for a component names the broken plugin and its error
    with pytest.raises(geopeft.UnknownComponentError) as info:
        geopeft.adapt(type(tiny)(), "lora", targets=["query"], manifold={"A": "stifel"})
    assert "broken" in str(info.value) and "ModuleNotFoundError" in str(info.value)

    # `geopeft plugins` lists it with its error
    capsys.readouterr()
    assert cli.main(["plugins"]) == 0
    report = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert report["broken"]["error"].startswith("ModuleNotFoundError")
    assert "geopeft_no_such_module" in report["broken"]["error"]
    assert report["broken"]["components"] == {}
    assert report["lora"]["error"] is None
    assert report["example"]["components"]["manifold"] == ["oblique"]


def test_allow_list_skips_a_broken_entry_point_without_warning(fresh_registry, monkeypatch):
    _with_extra_entry_points(
        monkeypatch, md.EntryPoint(name="broken", value="geopeft_no_such_module", group="geopeft"))
    monkeypatch.setenv("GEOPEFT_PLUGINS", "lora,example")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        reg = get_registry()
    assert set(reg.plugins) == {"core", "lora", "example"}


def test_entry_point_with_a_hook_matching_no_spec_fails_fast(fresh_registry, monkeypatch, tmp_path):
    (tmp_path / "geopeft_typo_plugin.py").write_text(
        "import geopeft\n\n"
        "@geopeft.hookimpl\n"
        "def register_manifold(register):\n"
        "    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _with_extra_entry_points(
        monkeypatch, md.EntryPoint(name="typo", value="geopeft_typo_plugin", group="geopeft"))
    with pytest.raises(geopeft.PluginError) as info:
        get_registry()
    msg = str(info.value)
    assert "register_manifold" in msg and "geopeft_typo_plugin" in msg
    assert "register_manifolds" in msg and "GEOPEFT_PLUGINS" in msg
    # the way out the message names works
    monkeypatch.setenv("GEOPEFT_PLUGINS", "lora,example")
    assert set(get_registry().plugins) == {"core", "lora", "example"}


# --------------------------------------------------------------------------- incompatible combinations
def test_usv_adapter_works_on_its_own(plugin, tiny):
    plugin(_usv_plugin(), "usv-plugin")
    geopeft.adapt(tiny, "toy_usv", targets=["query"], rank=2)
    (_, adapter), = geopeft.adapters(tiny)
    assert isinstance(adapter, USVAdapter)
    assert tiny(torch.randint(0, 50, (2, 5))).shape == (2, 3)


def test_transform_needing_a_b_refuses_a_usv_adapter(plugin, tiny):
    plugin(_usv_plugin(), "usv-plugin")
    with pytest.raises(geopeft.IncompatibleComponentsError) as info:
        geopeft.adapt(tiny, "toy_usv", targets=["query"], rank=2, transforms=["scaled_gd"])
    msg = str(info.value)
    assert "'scaled_gd'" in msg
    assert "'toy_usv'" in msg
    assert "A, B" in msg
    assert "U, S, V" in msg
    assert geopeft.adapters(tiny) == []


def test_initializer_needing_a_b_refuses_a_usv_adapter(plugin, tiny):
    plugin(_usv_plugin(), "usv-plugin")
    with pytest.raises(geopeft.IncompatibleComponentsError) as info:
        geopeft.adapt(tiny, "toy_usv", targets=["query"], initializer="lora")
    msg = str(info.value)
    assert "initializer 'lora'" in msg and "'toy_usv'" in msg and "A, B" in msg and "U, S, V" in msg


def test_manifold_for_a_factor_the_adapter_lacks(plugin, tiny):
    plugin(_usv_plugin(), "usv-plugin")
    with pytest.raises(geopeft.IncompatibleComponentsError) as info:
        geopeft.adapt(tiny, "toy_usv", targets=["query"], manifold={"Z": "oblique"})
    msg = str(info.value)
    assert "'Z'" in msg and "'oblique'" in msg and "'toy_usv'" in msg and "U, S, V" in msg

    with pytest.raises(geopeft.IncompatibleComponentsError) as info:
        geopeft.adapt(tiny, "lora", targets=["query"], manifold={"Z": "oblique"})
    msg = str(info.value)
    assert "'Z'" in msg and "'lora'" in msg and "A, B" in msg
    assert geopeft.adapters(tiny) == []


def test_single_factor_manifold_on_a_coupled_key_is_refused(tiny):
    with pytest.raises(geopeft.IncompatibleComponentsError) as info:
        geopeft.adapt(tiny, "lora", targets=["query"], manifold={"B,A": "oblique"})
    msg = str(info.value)
    assert "'oblique'" in msg and "takes one factor" in msg and "'B,A'" in msg


# --------------------------------------------------------------------------- options
def test_unknown_option_suggests_and_lists_accepted(tiny):
    with pytest.raises(geopeft.ConfigError) as info:
        geopeft.adapt(tiny, "lora", targets=["query"], rslorra=True)
    msg = str(info.value)
    assert "unknown option 'rslorra'" in msg
    assert "did you mean 'rslora'?" in msg
    accepted = msg.split("did you mean 'rslora'?", 1)[1]
    for option in ("rslora", "dropout", "alpha"):
        assert option in accepted
    assert "adapter 'lora'" in accepted
    assert geopeft.adapters(tiny) == []


def test_known_option_reaches_the_component(tiny):
    geopeft.adapt(tiny, "lora", targets=["query"], rank=4, alpha=8, rslora=True)
    (_, adapter), = geopeft.adapters(tiny)
    assert adapter.rslora is True
    assert adapter.scaling == pytest.approx(8 / 2)


@pytest.mark.parametrize("overrides, fragments", [
    ({"transforms": ["scaled_gd"], "delta": -1.0}, ["'scaled_gd'", "delta"]),
    ({"dropout": 1.5}, ["dropout", "1.5"]),
])
def test_bad_option_value_is_a_config_error_naming_the_option(tiny, overrides, fragments):
    """A component that rejects an option's value (ValueError in its constructor) must
    surface as ConfigError, like an unknown option, and leave the model untouched."""
    with pytest.raises(geopeft.ConfigError) as info:
        geopeft.adapt(tiny, "lora", targets=["query"], **overrides)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert geopeft.adapters(tiny) == []


@pytest.mark.parametrize("override, fragment", [
    ({"moments": "teleport"}, "moments='teleport'"),
    ({"project_every": 0}, "project_every must be a positive int"),
    ({"riemannian_grad": "yes"}, "riemannian_grad must be True or False"),
    ({"name": "x"}, "'name' cannot be overridden"),
    ({"adapter": 3}, "adapter must be a registered name or an Adapter subclass"),
])
def test_bad_recipe_overrides_are_config_errors(tiny, override, fragment):
    with pytest.raises(geopeft.ConfigError) as info:
        geopeft.adapt(tiny, "lora", targets=["query"], **override)
    assert fragment in str(info.value)


# --------------------------------------------------------------------------- geopeft.register (user code)
def test_register_from_user_code_has_the_plugin_checks(tiny):
    reg = get_registry()
    cls = _make_manifold("unit_mine")
    try:
        assert geopeft.register("manifold", "unit_mine", cls) is cls
        assert reg.plugin_of("manifold", "unit_mine") == "user"
        assert reg.plugins["user"].components == {"manifold": ["unit_mine"]}
        geopeft.register("manifold", "unit_mine", cls)  # the same object again: a no-op
        geopeft.adapt(tiny, "lora", targets=["query"], rank=2, manifold={"A": "unit_mine"})
        assert isinstance(tiny.query.adapter.factor_manifolds()["A"], cls)
        other = _make_manifold("unit_mine")
        with pytest.raises(geopeft.PluginError, match="replace=True"):
            geopeft.register("manifold", "unit_mine", other)
        geopeft.register("manifold", "unit_mine", other, replace=True)
        assert reg.get("manifold", "unit_mine") is other
    finally:
        geopeft.unregister("manifold", "unit_mine")
    assert "unit_mine" not in geopeft.components()["manifold"]
    # the checks of plugin registration: the interface, a free name, a known kind
    with pytest.raises(geopeft.PluginError, match="must be a subclass of geopeft.Manifold"):
        geopeft.register("manifold", "inst", cls())
    with pytest.raises(geopeft.PluginError, match="already registered by plugin 'core'; pick another"):
        geopeft.register("manifold", "euclidean", cls)
    with pytest.raises(geopeft.PluginError, match="must be an instance of geopeft.Recipe"):
        geopeft.register("method", "m", cls)
    with pytest.raises(ValueError, match="did you mean 'manifold'"):
        geopeft.register("manifolds", "x", cls)
    with pytest.raises(geopeft.PluginError, match="only those can be unregistered"):
        geopeft.unregister("manifold", "euclidean")


def test_registered_recipe_survives_a_registry_reload(fresh_registry, tiny):
    from geopeft.registry import reset_registry

    recipe = geopeft.Recipe(name="lora_obl", manifolds={"A": "oblique"})
    geopeft.register("method", "lora_obl", recipe)
    try:
        reset_registry()  # e.g. after GEOPEFT_PLUGINS changed: user registrations are kept
        geopeft.adapt(tiny, "lora_obl", targets=["query"], rank=2)
        assert type(tiny.query.adapter.factor_manifolds()["A"]).__name__ == "ObliqueManifold"
    finally:
        geopeft.unregister("method", "lora_obl")


def test_core_components_need_no_plugin_but_the_method_s(fresh_registry, monkeypatch, tiny):
    monkeypatch.setenv("GEOPEFT_PLUGINS", "stella")  # no `lora` plugin: euclidean, fixed are core's
    assert set(get_registry().plugins) == {"core", "stella"}
    geopeft.adapt(tiny, "stella", targets=["query"], rank=2)
    opt = geopeft.optimizer(tiny, torch.optim.AdamW, lr=1e-2)
    tiny(torch.randint(0, 50, (4, 5))).pow(2).mean().backward()
    opt.step()
    u = tiny.query.adapter.U.detach()
    assert torch.allclose(u.T @ u, torch.eye(2), atol=1e-5)
