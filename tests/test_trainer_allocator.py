"""The trainer asks CUDA's caching allocator for expandable segments, unless the user configured it."""

from runner.trainer import allocator


def test_expandable_segments_are_asked_for_when_nothing_is_set():
    env: dict[str, str] = {}
    allocator.configure(env)
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}


def test_a_users_own_allocator_settings_win_under_either_name():
    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        env = {name: "max_split_size_mb:128"}
        allocator.configure(env)
        assert env == {name: "max_split_size_mb:128"}
