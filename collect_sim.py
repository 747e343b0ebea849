"""Collect a simulated RLDS dataset of mixed quality (scripted experts with failure modes).

    python collect_sim.py task=lift episodes=200          # datasets/robosteer_sim_lift/1.0.0
    python collect_sim.py task=suite episodes=25          # every task: datasets/robosteer_sim_suite/1.0.0
    python collect_sim.py task=stack policy.corruption.scale=0 name=stack_clean   # clean experts
    python collect_sim.py sim.image_size=256 runner.workers=8 task=suite episodes=500

`episodes` is per task. An interrupted run resumes when rerun with the same command. See docs/sim.md.
"""

from configs.run import hydra_main


@hydra_main("collect_sim")
def main(cfg) -> None:
    from sim.collect import collect

    collect(cfg)


if __name__ == "__main__":
    main()
