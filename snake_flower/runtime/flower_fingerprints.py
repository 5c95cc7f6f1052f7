"""What ``flower_patches`` assumes of each checked flwr version, recorded from its source.

For every function a patch replaces or relies on: its ``inspect.signature`` and the
first 16 hex digits of the sha256 of its ``inspect.getsource``; for a constant: its
``repr``. flwr 1.41.0 was read from this project's venv, 1.42.0 from its wheel
(``pip download --no-deps flwr==1.42.0``); the two differ only in ``run_superexec``
(1.41.0 passes a tracing ``traceparent`` to ``launch_task``); ``in_memory_linkstate.py``, which
the pickup patch reads, is byte for byte the same in both wheels, and so are ``inflatable_utils.py``,
``array.py`` and ``arraychunk.py``, which the message-inflate patch reads. The fab-install
patch (``flower_patches.OPTIONAL``) was read on 1.42.0 alone, with 1.42.0 installed; 1.41.0
runs without it. To check a new version,
print ``flower_patches.fingerprint(ref)`` for every ref, read the changed functions, and add
the version here only if every patch still does what its docstring says.
"""

from __future__ import annotations

_FLWR_1_41_0 = {
    'flwr.server.superlink.fleet.vce.vce_api:add_messages_to_queue':
        '(state: flwr.server.superlink.linkstate.linkstate.LinkState, queue: queue.Queue[flwr.app.message.message.Message], nodes_mapping: dict[int, int], f_stop: threading.Event) -> None sha256:953f4bd41a931a77',
    'flwr.server.superlink.linkstate.in_memory_linkstate:InMemoryLinkState.__init__':
        '(self, federation_manager: flwr.superlink.federation.federation_manager.FederationManager, object_store: flwr.supercore.object_store.object_store.ObjectStore) -> None sha256:d50d022da60695f5',
    'flwr.server.superlink.linkstate.in_memory_linkstate:InMemoryLinkState.get_message_ins':
        '(self, node_id: int, limit: int | None, *, run_id: int | None = None) -> list[flwr.app.message.message.Message] sha256:6547c8dcbc62e12f',
    'flwr.server.superlink.linkstate.in_memory_linkstate:InMemoryLinkState._check_stored_messages':
        '(self, message_ids: set[str], run_id: int | None = None) -> None sha256:2be47567d2478a58',
    'flwr.supernode.start_client_internal:start_client_internal':
        "(*, state_factory: flwr.supernode.nodestate.nodestate_factory.NodeStateFactory, server_address: str, node_config: dict[str, bool | float | int | str], root_certificates: bytes | str | None = None, insecure: bool | None = None, authentication_keys: tuple[cryptography.hazmat.primitives.asymmetric.ec.EllipticCurvePrivateKey, cryptography.hazmat.primitives.asymmetric.ec.EllipticCurvePublicKey] | None = None, max_retries: int | None = None, max_wait_time: float | None = None, isolation: str = 'subprocess', runtime_api_address: str = '0.0.0.0:9094', runtime_certificates: tuple[bytes, bytes, bytes] | None = None, runtime_root_certificates_path: str | None = None, health_server_address: str | None = None, trusted_entities: dict[str, str] | None = None, superexec_auth_secret: bytes | None = None, runtime_dependency_install: bool = False) -> None sha256:9e89a6eb68fbec68",
    'flwr.supernode.start_client_internal:_push_messages':
        '(state: flwr.supernode.nodestate.nodestate.NodeState, object_store: flwr.supercore.object_store.object_store.ObjectStore, send: collections.abc.Callable[[flwr.app.message.message.Message, flwr.proto.message_pb2.ObjectTree, float], tuple[set[str], str]], push_object: collections.abc.Callable[[int, str, str, bytes], None]) -> None sha256:00bb86faffdec114',
    'flwr.supernode.cli.flower_supernode:flower_supernode':
        '() -> None sha256:e263e10452076b00',
    'flwr.supernode.cli.flower_supernode:_parse_args_run_supernode':
        '() -> argparse.ArgumentParser sha256:f57c3a4843d6b0a9',
    'flwr.supercore.inflatable.inflatable_utils:pull_objects':
        '(object_ids: list[str], pull_object_fn: collections.abc.Callable[[str], bytes], *, max_concurrent_pulls: int = 2, max_time: float | None = 7200, max_tries_per_object: int | None = 500, initial_backoff: float = 1, backoff_cap: float = 10) -> dict[str, bytes] sha256:31bb2de46b450e6a',
    'flwr.supercore.inflatable.inflatable_utils:pull_and_inflate_object_from_tree':
        "(object_tree: flwr.proto.message_pb2.ObjectTree, pull_object_fn: collections.abc.Callable[[str], bytes], confirm_object_received_fn: collections.abc.Callable[[str], None], *, return_type: type[~T] = <class 'flwr.supercore.inflatable.inflatable_object.InflatableObject'>, max_concurrent_pulls: int = 2, max_time: float | None = 7200, max_tries_per_object: int | None = 500, initial_backoff: float = 1, backoff_cap: float = 10) -> ~T sha256:139811483a15e4a6",
    'flwr.supercore.inflatable.inflatable_utils:inflate_object_from_contents':
        '(object_id: str, object_contents: dict[str, bytes], *, keep_object_contents: bool = False, objects: dict[str, flwr.supercore.inflatable.inflatable_object.InflatableObject] | None = None) -> flwr.supercore.inflatable.inflatable_object.InflatableObject sha256:93b98a2ea3f35c4f',
    'flwr.supercore.inflatable.inflatable_object:get_object_head_values_from_object_content':
        "(object_content: 'bytes') -> 'tuple[str, list[str], int]' sha256:d9288c47e775b67a",
    'flwr.app.message.array:Array.inflate':
        "(object_content: 'bytes', children: 'dict[str, InflatableObject] | None' = None) -> 'Array' sha256:a7afff3a6fd59978",
    'flwr.app.message.arraychunk:ArrayChunk.inflate':
        "(object_content: 'bytes', children: 'dict[str, InflatableObject] | None' = None) -> 'ArrayChunk' sha256:60afa91e51f707fd",
    'flwr.supercore.constant:PULL_INITIAL_BACKOFF':
        '1',
    'flwr.supercore.constant:PULL_BACKOFF_CAP':
        '10',
    'flwr.supercore.superexec.run_superexec:run_superexec':
        "(runtime_api_address: str, insecure: bool, root_certificates_path: str | None = None, superexec_auth_secret: bytes | None = None, plugin_config: dict[str, typing.Any] | None = None, parent_pid: int | None = None, health_server_address: str | None = None, runtime_dependency_install: bool = False, executor_type: flwr.supercore.constant.ExecutorType = <ExecutorType.SUBPROCESS: 'subprocess'>, executor_config: dict[str, object] | None = None) -> None sha256:d11f4e7fbc8f0b12",
    'flwr.supercore.superexec.executor.factory:get_executor':
        '(executor_type: flwr.supercore.constant.ExecutorType, executor_config: dict[str, object] | None = None, *, insecure: bool = False, root_certificates_path: str | None = None) -> flwr.supercore.superexec.executor.types.Executor sha256:891abfc53747803d',
    'flwr.supercore.superexec.executor.subprocess_executor:SubprocessExecutor.launch':
        '(self, spec: flwr.supercore.superexec.executor.types.ExecutionSpec) -> flwr.supercore.superexec.executor.types.LaunchResult sha256:83abf3dbe02281fd',
    'flwr.supercore.superexec.executor.types:ExecutionSpec':
        "(task_type: 'TaskType', runtime_api_address: 'str', token: 'str', insecure: 'bool', root_certificates_path: 'str | None', runtime_dependency_install: 'bool', parent_pid: 'int | None', suppress_output: 'bool', task_id: 'int', fab_hash: 'str | None' = None) -> None sha256:a52aad6399c9a5ec",
    'flwr.supercore.cli.flower_superexec:flower_superexec':
        '() -> None sha256:f0e2725c92a57597',
    'flwr.supernode.cli.flwr_clientapp:flwr_clientapp':
        '() -> None sha256:9e02b412fb895b05',
    'flwr.supernode.runtime.run_clientapp:run_clientapp':
        '(runtime_api_address: str, token: str, insecure: bool, certificates: bytes | None = None, parent_pid: int | None = None, runtime_dependency_install: bool = False) -> None sha256:6ce09559f3a2f5dc',
    'flwr.simulation.ray_transport.ray_actor:BasicActorPool.fetch_result_and_return_actor_to_pool':
        '(self, future: Any) -> tuple[flwr.app.message.message.Message, flwr.app.message.context.Context] sha256:4e9babbe276dedd7',
    'flwr.simulation.ray_transport.ray_actor:BasicActorPool.add_actor_back_to_pool':
        '(self, future: Any) -> None sha256:e88f89e6e878f4ce',
    'flwr.server.superlink.fleet.vce.backend.raybackend:RayBackend.process_message':
        '(self, message: flwr.app.message.message.Message, context: flwr.app.message.context.Context) -> tuple[flwr.app.message.message.Message, flwr.app.message.context.Context] sha256:32a5db14180222d3',
}

CHECKED: dict[str, dict[str, str]] = {
    "1.41.0": _FLWR_1_41_0,
    # the FAB installed once (flower_patches.OPTIONAL) was read on 1.42.0 only
    "1.42.0": {**_FLWR_1_41_0,
               'flwr.cli.install:install_from_fab':
                   '(fab_file: pathlib.Path | bytes, install_dir: pathlib.Path | None = None, skip_prompt: bool = False) -> pathlib.Path sha256:481bd04cde582322',
               'flwr.cli.install:validate_and_install':
                   '(project_dir: pathlib.Path, fab_hash: str, fab_name: str | None, install_dir: pathlib.Path | None, skip_prompt: bool = False) -> pathlib.Path sha256:628b69fb852ae858',
               'flwr.supercore.utils:get_flwr_home': '() -> pathlib.Path sha256:976b70dd0d24ea06',
               'flwr.common.constant:APP_DIR': "'apps'",
               'flwr.supercore.superexec.run_superexec:run_superexec':
                   "(runtime_api_address: str, insecure: bool, root_certificates_path: str | None = None, superexec_auth_secret: bytes | None = None, plugin_config: dict[str, typing.Any] | None = None, parent_pid: int | None = None, health_server_address: str | None = None, runtime_dependency_install: bool = False, executor_type: flwr.supercore.constant.ExecutorType = <ExecutorType.SUBPROCESS: 'subprocess'>, executor_config: dict[str, object] | None = None) -> None sha256:91e7a33c5b898f33"},
}
