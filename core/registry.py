"""Where components are found: core's own (`builtins`, the plugin "core"), pluggy
plugins from the `geopeft` entry-point group, and components registered from user
code with `geopeft.register` (the plugin "user").

Built-in plugins are entry points too. A plugin that fails to import is
recorded (name, distribution, error) and does not take the others down;
`GEOPEFT_PLUGINS=a,b` limits which entry points are loaded (core's components
are always there).
"""

from __future__ import annotations

import importlib.metadata as md
import os
import threading
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any

import pluggy

from . import builtins, hookspecs
from .errors import PluginError, UnknownComponentError, did_you_mean
from .hookspecs import PROJECT
from .kinds import KINDS

#: the plugin names of core's own components and of `geopeft.register`'s
CORE_PLUGIN = "core"
USER_PLUGIN = "user"

#: kind -> name -> object, registered from user code; kept across `reset_registry`
_USER_COMPONENTS: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}


@dataclass
class PluginInfo:
    """One loaded (or failed) plugin, as `geopeft plugins` reports it."""

    name: str
    distribution: str | None = None
    version: str | None = None
    components: dict[str, list[str]] = field(default_factory=dict)
    load_error: str | None = None
    #: errors met while running its hooks; rebuilt with every collection
    registration_errors: list[str] = field(default_factory=list)

    @property
    def error(self) -> str | None:
        errors = ([self.load_error] if self.load_error else []) + self.registration_errors
        return "; ".join(errors) or None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "distribution": self.distribution, "version": self.version,
                "components": self.components, "error": self.error}


@dataclass
class Entry:
    name: str
    obj: Any
    plugin: str


class Registry:
    """The loaded plugins and the components they register, by kind and name."""

    def __init__(self, load_entry_points: bool = True):
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self._components: dict[str, dict[str, Entry]] | None = None
        self._lock = threading.RLock()
        self.pm.register(builtins, name=CORE_PLUGIN)
        self.plugins[CORE_PLUGIN] = PluginInfo(CORE_PLUGIN, "geopeft", _version())
        if load_entry_points:
            self._load_entry_points()

    # ------------------------------------------------------------------ loading
    def _load_entry_points(self) -> None:
        allowed = _allow_list()
        for ep in md.entry_points(group=PROJECT):
            if allowed is not None and ep.name not in allowed:
                continue
            dist = getattr(ep, "dist", None)
            info = PluginInfo(ep.name, dist.name if dist else None, dist.version if dist else None)
            self.plugins[ep.name] = info
            try:
                module = ep.load()
            except Exception as exc:  # a broken plugin must not take the others down
                info.load_error = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"geopeft plugin {ep.name!r} ({info.distribution}) failed to load: "
                              f"{info.load_error}", RuntimeWarning, stacklevel=2)
                continue
            if self.pm.is_registered(module):
                continue
            self.pm.register(module, name=ep.name)
        self._check_pending()

    def _check_pending(self) -> None:
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            valid = ", ".join(k.hook for k in KINDS.values())
            name = self.pm.get_name(exc.plugin) or exc.plugin
            raise PluginError(
                f"plugin {name!r} implements a hook that geopeft does not define: {exc}. "
                f"Valid hooks: {valid}. Fix the plugin, or leave it out with "
                f"GEOPEFT_PLUGINS=<the plugins to load>."
            ) from exc

    def register_plugin(self, plugin: Any, name: str) -> None:
        """Register a plugin object by hand (tests, notebooks)."""
        with self._lock:
            self.pm.register(plugin, name=name)
            try:
                self._check_pending()
            except PluginError:
                self.pm.unregister(name=name)  # a rejected plugin must not linger
                raise
            self.plugins[name] = PluginInfo(name)
            self._components = None

    def unregister_plugin(self, name: str) -> None:
        with self._lock:
            self.pm.unregister(name=name)
            self.plugins.pop(name, None)
            self._components = None

    # ------------------------------------------------------------------ collecting
    def _collect(self) -> dict[str, dict[str, Entry]]:
        with self._lock:
            if self._components is not None:
                return self._components
            components: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
            for info in self.plugins.values():
                info.components = {}
                info.registration_errors = []
            for kind in KINDS.values():
                hook = getattr(self.pm.hook, kind.hook)
                for impl in hook.get_hookimpls():  # registration order
                    register = self._make_register(kind.name, impl.plugin_name, components[kind.name])
                    try:
                        impl.function(register=register)
                    except Exception as exc:
                        self._fail(impl.plugin_name, f"{kind.hook} raised {type(exc).__name__}: {exc}"
                                   f"\n{traceback.format_exc(limit=3)}")
            for kind, named in _USER_COMPONENTS.items():  # user code last: plugins keep their names
                if named:
                    register = self._make_register(kind, USER_PLUGIN, components[kind])
                    for name, obj in named.items():
                        register(name, obj)
            self._components = components
            return components

    def _make_register(self, kind: str, plugin: str, table: dict[str, Entry]):
        def register(name: str, obj: Any) -> None:
            self._validate(kind, plugin, name, obj)
            if name in table:
                self._fail(plugin, f"{kind} {name!r} is already registered by plugin "
                                   f"{table[name].plugin!r}; keeping that one")
                return
            table[name] = Entry(name, obj, plugin)
            info = self.plugins.setdefault(plugin, PluginInfo(plugin))
            info.components.setdefault(kind, []).append(name)
        return register

    def _validate(self, kind: str, plugin: str, name: str, obj: Any) -> None:
        if not isinstance(name, str) or not name or "," in name:
            raise PluginError(f"plugin {plugin!r} registered a {kind} with an invalid name {name!r} "
                              "(a non-empty string without commas)")
        spec = KINDS[kind]
        ok = isinstance(obj, spec.base) if spec.instance else (
            isinstance(obj, type) and issubclass(obj, spec.base))
        if not ok:
            got = type(obj).__name__ if spec.instance else repr(obj)
            raise PluginError(f"plugin {plugin!r}: {kind} {name!r} must be {spec.expected}, got {got}")

    # ------------------------------------------------------------------ user code
    def register(self, kind: str, name: str, obj: Any, *, replace: bool = False) -> None:
        """Register a component class (or, for kind "method", a Recipe) from user code under
        the plugin "user": the checks of plugin registration, and a name already taken is an
        error (`replace=True` replaces an earlier `register` of the same name)."""
        self._kind(kind)
        with self._lock:
            self._validate(kind, USER_PLUGIN, name, obj)
            table = self._table(kind)
            taken = table.get(name)
            if taken is not None and not (replace and taken.plugin == USER_PLUGIN):
                if taken.obj is obj:
                    return  # the same object again (a re-run notebook cell): nothing to do
                hint = (" (pass replace=True to replace your earlier registration)"
                        if taken.plugin == USER_PLUGIN else "; pick another name")
                raise PluginError(f"{KINDS[kind].label} {name!r} is already registered by plugin "
                                  f"{taken.plugin!r}{hint}")
            _USER_COMPONENTS[kind][name] = obj
            self._components = None

    def unregister(self, kind: str, name: str) -> None:
        """Forget a component registered with `register`."""
        self._kind(kind)
        with self._lock:
            if name not in _USER_COMPONENTS[kind]:
                raise PluginError(f"{KINDS[kind].label} {name!r} was not registered with "
                                  "geopeft.register; only those can be unregistered")
            del _USER_COMPONENTS[kind][name]
            self._components = None

    def name_of(self, kind: str, obj: Any) -> str | None:
        """The name under which the class `obj` is registered (None if it is not)."""
        for entry in self._table(kind).values():
            if entry.obj is obj:
                return entry.name
        return None

    def _fail(self, plugin: str, message: str) -> None:
        info = self.plugins.setdefault(plugin, PluginInfo(plugin))
        info.registration_errors.append(message)
        warnings.warn(f"geopeft plugin {plugin!r}: {message}", RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------ lookup
    def items(self, kind: str) -> list[tuple[str, Any]]:
        """[(name, registered object)] of `kind`, in registration order."""
        return [(name, entry.obj) for name, entry in self._table(kind).items()]

    def names(self, kind: str) -> list[str]:
        return sorted(self._table(kind))

    def get(self, kind: str, name: str) -> Any:
        """The registered class (or Recipe) for `name`; a helpful error when unknown."""
        table = self._table(kind)
        if name in table:
            return table[name].obj
        label = KINDS[kind].label
        available = sorted(table)
        message = (f"unknown {label} {name!r}{did_you_mean(name, available)} "
                   f"available: {', '.join(available) or '(none)'}")
        broken = [f"{p.name} ({p.distribution or 'registered by hand'}): {p.error}"
                  for p in self.plugins.values() if p.error]
        if broken:
            message += ". Plugins that failed to load: " + "; ".join(broken)
        raise UnknownComponentError(message)

    def plugin_of(self, kind: str, name: str) -> str:
        return self._table(kind)[name].plugin

    def components(self) -> dict[str, list[str]]:
        return {kind: self.names(kind) for kind in KINDS}

    def _table(self, kind: str) -> dict[str, Entry]:
        self._kind(kind)
        return self._collect()[kind]

    @staticmethod
    def _kind(kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown component kind {kind!r}"
                             f"{did_you_mean(kind, list(KINDS)) or ';'} kinds: {', '.join(KINDS)}")


def _version() -> str:
    try:
        return md.version("geopeft")
    except md.PackageNotFoundError:
        return "unknown"


def _allow_list() -> set[str] | None:
    raw = os.environ.get("GEOPEFT_PLUGINS")
    if raw is None or not raw.strip():
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


_REGISTRY: Registry | None = None
_REGISTRY_LOCK = threading.Lock()


def get_registry() -> Registry:
    """The process-wide registry, loaded from entry points on first use."""
    global _REGISTRY
    with _REGISTRY_LOCK:
        if _REGISTRY is None:
            _REGISTRY = Registry()
        return _REGISTRY


def reset_registry() -> None:
    """Forget the loaded plugins; the next lookup loads them again (reads GEOPEFT_PLUGINS)."""
    global _REGISTRY
    with _REGISTRY_LOCK:
        _REGISTRY = None
