"""Drive a real WidowX (bridge_data_robot's WidowX service) with a policy, safely, and record episodes.

    python deploy_robot.py policy=random instruction="put the spoon on the towel" robot.host=192.168.1.10
    python deploy_robot.py policy=<name> steer=true instruction="..." robot.host=<ip>   # V-GPS steering
    python deploy_robot.py ... dry_run=true        # read observations only, print the actions it would send
    python deploy_robot.py ... episodes=10 success=false max_steps=120 name=spoon_day1
    python deploy_robot.py robot=sim instruction="..."   # rehearse: python -m real_robot.sim_service

Set-up, safety defaults and recording: docs/real_robot.md.
"""

from configs.run import hydra_main


@hydra_main("deploy_robot")
def main(cfg) -> None:
    from real_robot.deploy import deploy

    deploy(cfg)


if __name__ == "__main__":
    main()
