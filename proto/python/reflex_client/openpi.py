"""`ReflexPolicy`: the `openpi_client.BasePolicy` interface on a reflex server, so code
written for openpi (`policy.infer(obs)["actions"]`, `ActionChunkBroker`, the runtime's
`PolicyAgent`) runs on reflex unchanged — swap `WebsocketClientPolicy(host, port)` for
`ReflexPolicy(Client(target))`.

openpi observations are dicts whose keys depend on the robot; the adapter finds:

- images: the entries of `obs["images"]` (ALOHA: `{"cam_high": …}`) and every top-level
  array whose key contains "image" (LIBERO: `observation/image`, `observation/wrist_image`;
  DROID: `observation/exterior_image_1_left`, …). CHW arrays are transposed to HWC and float
  images in [0, 1] scaled to uint8, as openpi's image_tools do. They go to the model's
  cameras by name when the names match (after dropping an `observation/` or
  `observation.images.` prefix), else in order; `cameras={obs_key: camera}` says it
  explicitly.
- state: `state_key`, else `state`, `observation/state` or `observation.state`, else DROID's
  `observation/joint_position` + `observation/gripper_position`, concatenated.
- instruction: `obs["prompt"]`.

`infer` returns `{"actions": float32 [chunk, action_dim], "server_timing": {"infer_ms"},
"policy_timing": {"infer_ms"}, "reflex": {seq, noise_seed, cache, recorded, model_hash}}`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from .client import Client
from .messages import ModelInfo

__all__ = ["ReflexPolicy"]

_STATE_KEYS = ("state", "observation/state", "observation.state")
_DROID_STATE = ("observation/joint_position", "observation/gripper_position")
_PREFIXES = ("observation/", "observation.images.", "observation.", "images/")


def _hwc_uint8(img: Any) -> npt.NDArray[np.uint8]:
    a = np.asarray(img)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[2] not in (1, 3):
        a = np.transpose(a, (1, 2, 0))
    if np.issubdtype(a.dtype, np.floating):
        a = (255.0 * np.clip(a, 0.0, 1.0)).astype(np.uint8)
    elif a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8)
    return a


def _strip(key: str) -> str:
    for p in _PREFIXES:
        if key.startswith(p):
            return key[len(p) :]
    return key


class ReflexPolicy:
    """An openpi-compatible policy (`infer(obs) -> dict`, `reset()`) backed by a reflex
    `Client`. Registered as a virtual subclass of `openpi_client.base_policy.BasePolicy`
    when openpi-client is installed.

    Args:
        client: a connected `Client`.
        cameras: `{observation key: model camera}`; default: by name, else in order.
        state_key: the observation key of the state; default: see the module doc.
        prompt_key: the key of the instruction.
        episode_id: sent with every call (recorded in traces).
        noise_seed: a fixed noise seed for every call (None: the server draws one).
        timeout_s: the deadline of each call (default: the client's).
    """

    def __init__(
        self,
        client: Client,
        *,
        cameras: Mapping[str, str] | None = None,
        state_key: str | None = None,
        prompt_key: str = "prompt",
        episode_id: str | None = None,
        noise_seed: int | None = None,
        timeout_s: float | None = None,
    ) -> None:
        self.client = client
        self.cameras = dict(cameras) if cameras is not None else None
        self.state_key = state_key
        self.prompt_key = prompt_key
        self.episode_id = episode_id
        self.noise_seed = noise_seed
        self.timeout_s = timeout_s
        self._info: ModelInfo = client.info()

    def get_server_metadata(self) -> dict[str, Any]:
        """What `WebsocketClientPolicy.get_server_metadata()` gives: the model's info."""
        i = self._info
        return {
            "model_hash": i.model_hash,
            "model_type": i.model_type,
            "embodiment": i.embodiment,
            "cameras": list(i.cameras),
            "image_size": list(i.image_size),
            "state_dim": i.state_dim,
            "action_dim": i.action_dim,
            "action_horizon": i.chunk_size,
            "reflex_version": i.reflex_version,
        }

    def _images(self, obs: Mapping[str, Any]) -> dict[str, Any] | list[Any]:
        found: list[tuple[str, Any]] = []
        nested = obs.get("images")
        if isinstance(nested, Mapping):
            found.extend((str(k), v) for k, v in nested.items())
        for k, v in obs.items():
            if k != "images" and "image" in k and isinstance(v, np.ndarray) and v.ndim == 3:
                found.append((k, v))
        if not found:
            raise ValueError(f"no image in the observation (keys: {sorted(obs)})")
        if self.cameras is not None:
            return {self.cameras[k]: _hwc_uint8(v) for k, v in found if k in self.cameras}
        model = set(self._info.cameras)
        names = [_strip(k) for k, _ in found]
        if all(n in model for n in names):
            return {n: _hwc_uint8(v) for n, (_, v) in zip(names, found)}
        return [_hwc_uint8(v) for _, v in found]

    def _state(self, obs: Mapping[str, Any]) -> npt.NDArray[np.float32]:
        if self.state_key is not None:
            return np.asarray(obs[self.state_key], dtype=np.float32).ravel()
        for k in _STATE_KEYS:
            if k in obs:
                return np.asarray(obs[k], dtype=np.float32).ravel()
        if all(k in obs for k in _DROID_STATE):
            return np.concatenate(
                [np.asarray(obs[k], dtype=np.float32).ravel() for k in _DROID_STATE]
            )
        raise ValueError(
            f"no state in the observation (looked for {', '.join(_STATE_KEYS)}; keys: {sorted(obs)})"
        )

    def infer(self, obs: dict) -> dict:  # type: ignore[type-arg]  # openpi's signature
        """One observation dict in, `{"actions": [chunk, action_dim], …}` out."""
        chunk = self.client.act(
            self._images(obs),
            str(obs.get(self.prompt_key, "")),
            self._state(obs),
            episode_id=self.episode_id,
            noise_seed=self.noise_seed,
            timeout_s=self.timeout_s,
        )
        return {
            "actions": chunk.actions,
            "server_timing": {"infer_ms": chunk.latency.total_ms},
            "policy_timing": {"infer_ms": chunk.round_trip_ms},
            "reflex": {
                "seq": chunk.seq,
                "noise_seed": chunk.noise_seed,
                "cache": chunk.cache,
                "recorded": chunk.recorded,
                "model_hash": chunk.model_hash,
            },
        }

    def reset(self) -> None:
        """Nothing to reset: every call carries its whole observation."""


try:  # openpi-client is optional; with it, isinstance(policy, BasePolicy) holds
    from openpi_client.base_policy import BasePolicy as _BasePolicy
except ImportError:  # pragma: no cover - depends on the environment
    pass
else:
    _BasePolicy.register(ReflexPolicy)
