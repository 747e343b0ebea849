"""Fixtures of the Q-SFT tests: the policy tests' small sim dataset and one-thread torch."""

from tests.policies.conftest import one_thread, policy_data_dir  # noqa: F401 - fixtures
