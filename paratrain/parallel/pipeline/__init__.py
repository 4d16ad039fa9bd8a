"""Pipeline parallelism: schedules as data (schedule.py), an executor that runs them, timelines."""
