"""ReflexPolicy is an openpi BasePolicy: openpi-client's own ActionChunkBroker and
PolicyAgent drive reflex unchanged, with LIBERO-, DROID- and ALOHA-style observations."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import STATE, frame

from reflex_client import Client, InvalidArgument, ReflexPolicy

from openpi_client import action_chunk_broker, base_policy  # noqa: E402
from openpi_client.runtime.agents import policy_agent  # noqa: E402


def libero_obs() -> dict:
    return {
        "observation/image": frame(1, 256, 256),
        "observation/wrist_image": frame(2, 256, 256),
        "observation/state": STATE,
        "prompt": "pick up the red cup",
    }


def test_openpi_code_runs_on_reflex_unchanged(serve) -> None:
    s = serve()
    with Client(s.unix) as c:
        policy = ReflexPolicy(c, noise_seed=21)
        assert isinstance(policy, base_policy.BasePolicy)
        assert policy.get_server_metadata()["action_horizon"] == 50

        out = policy.infer(libero_obs())
        assert out["actions"].shape == (50, 7)
        assert out["server_timing"]["infer_ms"] > 0
        # Same as a direct call with the cameras in the model's order.
        direct = c.act(
            [frame(1, 256, 256), frame(2, 256, 256)], "pick up the red cup", STATE, noise_seed=21
        )
        np.testing.assert_array_equal(out["actions"], direct.actions)

        # openpi's ActionChunkBroker: one call per 10 actions, rows in order.
        broker = action_chunk_broker.ActionChunkBroker(policy, action_horizon=10)
        seqs = set()
        rows = []
        for _ in range(25):
            r = broker.infer(libero_obs())
            rows.append(r["actions"])
            seqs.add(r["reflex"]["seq"])
        assert len(seqs) == 3
        np.testing.assert_array_equal(np.stack(rows[:10]), direct.actions[:10])
        broker.reset()

        # openpi's runtime agent.
        agent = policy_agent.PolicyAgent(policy)
        assert agent.get_action(libero_obs())["actions"].shape == (50, 7)


def test_observation_layouts(serve) -> None:
    s = serve()
    with Client(s.unix) as c:
        policy = ReflexPolicy(c, noise_seed=3)
        # ALOHA: images under "images", CHW, by camera name.
        aloha = {
            "images": {
                "base": np.transpose(frame(1, 224, 224), (2, 0, 1)),
                "wrist": np.transpose(frame(2, 224, 224), (2, 0, 1)),
            },
            "state": STATE,
            "prompt": "fold",
        }
        a = policy.infer(aloha)["actions"]
        b = c.act({"base": frame(1, 224, 224), "wrist": frame(2, 224, 224)}, "fold", STATE, noise_seed=3)
        np.testing.assert_array_equal(a, b.actions)
        # Float images in [0, 1] are scaled as openpi's image_tools do.
        floats = dict(aloha, images={"base": frame(1, 224, 224).astype(np.float32) / 255.0})
        assert policy.infer(floats)["actions"].shape == (50, 7)
        # DROID: joint + gripper positions make the state.
        droid = {
            "observation/exterior_image_1_left": frame(1),
            "observation/joint_position": STATE[:7],
            "observation/gripper_position": STATE[7:],
            "prompt": "fold",
        }
        assert policy.infer(droid)["actions"].shape == (50, 7)
        # An explicit camera map.
        mapped = ReflexPolicy(c, cameras={"cam_high": "base"}, state_key="qpos")
        out = mapped.infer({"images": {"cam_high": frame(1)}, "qpos": STATE, "prompt": "x"})
        assert out["actions"].shape == (50, 7)
        # Bad input is the server's typed error; missing pieces say what is missing.
        with pytest.raises(InvalidArgument, match="state"):
            policy.infer(dict(aloha, state=STATE[:3]))
        with pytest.raises(ValueError, match="no state"):
            policy.infer({"images": aloha["images"], "prompt": "x"})
        with pytest.raises(ValueError, match="no image"):
            policy.infer({"state": STATE})
