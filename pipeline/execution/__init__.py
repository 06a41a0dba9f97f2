"""Every `import ray`: Ray tasks, Ray Train and Ray Tune."""
