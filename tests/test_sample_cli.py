"""``python -m mvar.sample`` labels each run by what its weights were trained for."""

from __future__ import annotations

import torch

from mvar.checkpoints import official_transformer_state_dict, save_model
from mvar.sample import main


def test_runs_are_labelled_by_the_attention_their_weights_were_trained_for(tmp_path, tiny_tokenizer,
                                                                          tiny_transformer, capsys):
    tokenizer = tmp_path / "tok.safetensors"
    save_model(tokenizer, tiny_tokenizer)
    torch.save({"mvar_wo_ddp": official_transformer_state_dict(tiny_transformer, mask="block-diagonal")},
               tmp_path / "mvar-d16.pth")
    torch.save(official_transformer_state_dict(tiny_transformer), tmp_path / "var_d16.pth")
    common = ["--tokenizer", str(tokenizer), "--classes", "1", "--per-class", "1", "--mode", "both",
              "--device", "cpu", "--out", str(tmp_path / "grid.png")]
    main([*common, "--transformer", str(tmp_path / "mvar-d16.pth")])
    printed = capsys.readouterr().out
    assert "MVAR (mvar-d16.pth, trained with MVAR attention): 1 images" in printed
    assert "MVAR weights with VAR attention, not trained for it (mvar-d16.pth)" in printed
    main([*common, "--transformer", str(tmp_path / "var_d16.pth")])
    printed = capsys.readouterr().out
    assert "VAR (var_d16.pth, trained with VAR attention)" in printed
    assert "VAR weights with MVAR attention, not trained for it (var_d16.pth)" in printed
    main([*common, "--random-init", "tiny"])
    assert "MVAR attention on random weights" in capsys.readouterr().out
