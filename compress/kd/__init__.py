"""Knowledge distillation shared by every stage that distils: KD losses (a registry), the KD hook and
``kd:`` options, and teacher resolution. The ``distill`` stage itself lives in compress/stages/distill.py.

Named ``kd``, not ``distill``: ``compress.distill`` is the public function ``compress.distill(student,
teacher, ...)``, and importing a subpackage ``compress.distill`` would rebind that attribute (and make
``import compress.distill.losses`` fail once the function is bound).
"""
from compress.kd.hook import DistillHook, HintConfig, KDConfig, KDLossName, check_kd, kd_hook
from compress.kd.losses import KD_LOSSES, kd_loss, register_kd_loss
from compress.kd.teachers import frozen

__all__ = ["Distiller", "DistillHook", "HintConfig", "KDConfig", "KDLossName", "KD_LOSSES", "check_kd", "frozen", "kd_hook",
           "kd_loss", "register_kd_loss"]


def __getattr__(name: str):
    # Lazily: the Distiller reads the distill stage's DistillConfig, whose module imports this package.
    if name == "Distiller":
        from compress.kd.distiller import Distiller

        return Distiller
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
