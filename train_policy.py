"""Train the project's generalist policies by behaviour cloning on robot episodes.

    python train_policy.py policy=vla                      # tokenized VLA (SFT on action tokens), data=sim
    python train_policy.py policy=flow                     # Octo-style chunked flow-matching policy
    python train_policy.py policy=vla data=bridge data.data_dir=/data steps=200000 name=vla_bridge
    python train_policy.py policy=vla policy.model.lm.pretrained=HuggingFaceTB/SmolLM2-135M

Rerunning with the same `name` (or `resume=<run dir>`) resumes from the latest checkpoint. Act with
a trained policy: `policy=vla policy.checkpoint=runs/train_policy/<name>` (docs/policies.md).
"""

from configs.run import hydra_main


@hydra_main("train_policy")
def main(cfg) -> None:
    from policies.training import train_policy

    train_policy(cfg)


if __name__ == "__main__":
    main()
