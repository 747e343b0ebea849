"""Train the V-GPS value function (Cal-QL or IQL) on robot episodes.

    python train_value.py                                  # embedded default: simulated suite, Cal-QL
    python train_value.py data=bridge data.data_dir=/data  # BridgeData V2, the V-GPS recipe
    python train_value.py value=iql steps=200000 name=iql_sim
    python train_value.py +experiment=cpu_small            # a short CPU run (small encoder, 64 px)
    torchrun --nproc_per_node=8 train_value.py data=bridge # data parallel on 8 GPUs

Rerunning with the same `name` (or `resume=<run dir>`) resumes from the latest checkpoint.
"""

from configs.run import hydra_main


@hydra_main("train_value")
def main(cfg) -> None:
    from values.train import train_value

    train_value(cfg)


if __name__ == "__main__":
    main()
