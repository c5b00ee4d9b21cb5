"""``${VAR}`` and ``${VAR:-default}`` in recipes: resolved from the environment, values remembered so that
no saved file and no message holds them (``compress.safety.scrub``/``redact``).

Apart from ``compress.recipe`` so that loading a checkpoint (whose saved spec keeps ``${VAR}``) need not
import the recipe machinery.
"""
from __future__ import annotations

import os
import re
from typing import Any

import yaml

from compress import yamlsafe
from compress.errors import RecipeError
from compress.safety import MIN_SECRET_LEN


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate(node: Any, env: dict | None = None, path: str = "", used: dict | None = None) -> Any:
    """Resolve ``${VAR}``s; ``used`` (if given) collects value -> variable for every value taken from ``env``."""
    env = os.environ if env is None else env
    if isinstance(node, dict):
        return {k: interpolate(v, env, f"{path}.{k}" if path else str(k), used) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env, f"{path}[{i}]", used) for i, v in enumerate(node)]
    if isinstance(node, str) and "${" in node:
        def sub(m):
            var, default = m.group(1), m.group(2)
            if var in env and env[var] != "":
                if used is not None and len(env[var]) >= MIN_SECRET_LEN:
                    used[env[var]] = var
                return env[var]
            if default is not None:
                return default
            raise RecipeError(path, f"environment variable {var} is not set (write ${{{var}:-default}} for a default)")

        value = _VAR.sub(sub, node)
        if _VAR.fullmatch(node):  # a whole-value variable takes the type YAML gives its text
            try:
                return yamlsafe.loads(value) if value.strip() else value
            except yaml.YAMLError:
                return value
        return value
    return node
