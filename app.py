"""MVAR Studio entry point.

The Gradio app (issue: app/) is not built yet. Until it is, this writes a sample grid with the
command-line sampler: from the default models in assets/ when they are there, otherwise from
untrained "tiny" models, clearly labelled as such.
"""

from pathlib import Path

from mvar import sample

ASSETS = Path(__file__).resolve().parent / "assets"

if __name__ == "__main__":
    if (ASSETS / "tokenizer.safetensors").exists() and (ASSETS / "mvar.safetensors").exists():
        sample.main(["--mode", "both", "--per-class", "2", "--filmstrip", "--out", "samples.png"])
    else:
        print("The Gradio app and the trained default models are not in this version yet; "
              "writing a smoke-test grid from untrained models instead.")
        sample.main(["--random-init", "tiny", "--mode", "both", "--per-class", "1", "--out", "samples.png"])
