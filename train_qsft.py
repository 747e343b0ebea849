"""Q-SFT: Q-learning as supervised fine-tuning of a VLA or VLM on robot episodes (docs/qsft.md).

    python train_qsft.py                                   # the project's tokenized VLA, data=sim
    python train_qsft.py policy.model.init=runs/train_policy/vla behaviour=frozen   # pi_phi trained beforehand
    python train_qsft.py vlm=smolvlm batch_size=16 gradient_checkpointing=true      # a Hugging Face VLM
    python train_qsft.py data=bridge data.data_dir=/data gamma=0.98 name=qsft_bridge

Rerunning with the same `name` (or `resume=<run dir>`) resumes from the latest checkpoint. Act with
`python eval_sim.py policy=qsft policy.checkpoint=runs/train_qsft/<name> policy.beta=1`.
"""

from configs.run import hydra_main


@hydra_main("train_qsft")
def main(cfg) -> None:
    from policies.qsft.training import train_qsft

    train_qsft(cfg)


if __name__ == "__main__":
    main()
