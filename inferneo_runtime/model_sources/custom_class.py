"""`--model-class module:Class`: a CustomModel subclass (inferneo_runtime.models) that loads what it loads; a
CustomHost serves it."""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..model_config import DTYPES
from .common import ModelSourceError, Resolved, ServeOptions


@dataclass
class CustomClass(Resolved):
    kind = "custom"

    model_class: Optional[str] = None  # module:Class

    @classmethod
    def matches(cls, spec) -> bool:
        return bool(spec.model_class)

    @classmethod
    def resolve(cls, spec, options: ServeOptions) -> "CustomClass":
        from ..models import CustomModel

        if spec.quantization or spec.adapters or DTYPES.get(spec.dtype or "auto"):
            raise ModelSourceError(f"--model-class {spec.model_class}: --dtype, --quantization and --adapter apply "
                                   f"to artifacts and checkpoints; a custom model class loads what it loads")
        model_cls = import_class(spec.model_class)
        if not (isinstance(model_cls, type) and issubclass(model_cls, CustomModel)):
            raise ModelSourceError(f"--model-class {spec.model_class!r} is not a subclass of "
                                   f"inferneo_runtime.models.CustomModel")
        name = spec.name or model_cls.model_name or (Path(spec.path).name if spec.path not in ("", ".")
                                                     else model_cls.__name__)
        return cls(name=name, source=str(spec.path), model_class=spec.model_class,
                   weight_bytes=int(model_cls.estimate_bytes(str(spec.path))), validated=False,
                   notes=[f"custom model class {spec.model_class}: generation is the class's own, not validated "
                          f"by Inferneo"])

    def load(self, device: str = "cpu", threads: Optional[int] = None):
        return load_custom(self.model_class, self.source)


def import_class(spec: str):
    """`module:Class` (or module.Class) imported; the working directory is on the path, as for uvicorn apps."""
    module, sep, attr = spec.partition(":")
    if not sep:
        module, _, attr = spec.rpartition(".")
    if not module or not attr:
        raise ModelSourceError(f"--model-class {spec!r}: expected module:Class")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ModelSourceError(f"--model-class {spec!r}: cannot import it: {e}") from None
    return obj


def load_custom(class_path: str, path: str):
    """Import, construct and load a custom model class; a CustomHost serves it."""
    from ..models import CustomHost

    model = import_class(class_path)(path)
    model.load()
    return CustomHost(model, class_path)
