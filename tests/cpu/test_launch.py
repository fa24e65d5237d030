"""The CPU recipes' Hydra callbacks: a one-process group for a plain ``python -m verl.trainer.sft_trainer``."""

from karl_verl.cpu.launch import TORCHRUN_VARIABLES, single_process_group_environment


def test_a_plain_start_becomes_rank_0_of_1_on_a_free_local_port():
    env = single_process_group_environment({})
    assert set(env) == set(TORCHRUN_VARIABLES)
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"]) == ("0", "0", "1", "127.0.0.1")
    assert 0 < int(env["MASTER_PORT"]) < 65536


def test_a_torchrun_start_is_left_as_torchrun_made_it():
    assert single_process_group_environment({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}) == {}
    assert single_process_group_environment({"MASTER_PORT": "29500"}) == {}
