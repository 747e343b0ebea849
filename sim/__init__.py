"""robosuite tasks with language instructions, scripted experts, parallel rollout/eval, videos."""
