"""Hostile model folders: code planted behind auto_map, and a pickle that acts when loaded."""

from __future__ import annotations

import json
from pathlib import Path

CODE_FILE = "planted_code.py"


class Payload:
    """Unpickling this opens (creates) ``marker``: what a hostile pytorch_model.bin could do instead."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant_code(folder: Path, marker: Path, unknown_model_type: bool = False) -> Path:
    """auto_map entries in every config file of ``folder``, all pointing at a module that writes ``marker``."""
    (folder / CODE_FILE).write_text(
        f"open({str(marker)!r}, 'w').write('model folder code ran')\n"
        "from transformers import PretrainedConfig\n"
        "class PlantedConfig(PretrainedConfig):\n    model_type = 'planted'\n"
        "class Planted:\n    pass\n",
        encoding="utf-8",
    )
    module = CODE_FILE.removesuffix(".py")
    entries = {
        "config.json": {
            "AutoConfig": f"{module}.PlantedConfig",
            "AutoModel": f"{module}.Planted",
            "AutoModelForImageTextToText": f"{module}.Planted",
            "AutoModelForCausalLM": f"{module}.Planted",
        },
        "tokenizer_config.json": {"AutoTokenizer": [f"{module}.Planted", f"{module}.Planted"]},
        "preprocessor_config.json": {"AutoImageProcessor": f"{module}.Planted", "AutoProcessor": f"{module}.Planted"},
        "processor_config.json": {"AutoProcessor": f"{module}.Planted"},
    }
    planted = 0
    for name, auto_map in entries.items():
        path = folder / name
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            data["auto_map"] = auto_map
            if unknown_model_type and name == "config.json":
                data["model_type"] = "planted"
            path.write_text(json.dumps(data, indent=2), encoding="utf-8")
            planted += 1
    assert planted >= 2, f"{folder}: expected config files to plant into"
    return folder
