"""Serve a policy over the network: openpi's policy-server wire format plus robosteer's steering extension.

    python serve_policy.py policy=random port=8000
    python serve_policy.py policy=flow policy.checkpoint=runs/train_policy/flow
    python serve_policy.py policy=octo warmup_k=[1,10]          # inside Octo's own environment
    python eval_sim.py policy=remote policy.host=<server> steer=true steering.critic=<run dir>

Also: max_clients=4 max_size=<bytes> api_key=<key> host=127.0.0.1. GET /healthz answers 200.
Each client connection gets its own policy instance. Wire format, Octo set-up: docs/serving.md.
"""

from configs.run import hydra_main


@hydra_main("serve_policy")
def main(cfg) -> None:
    from policies.server import serve

    serve(cfg)


if __name__ == "__main__":
    main()
