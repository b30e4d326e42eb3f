{
  "targets": [
    {
      "target_name": "nvml",
      "sources": ["nvml.c"],
      "cflags": ["-std=c11", "-Wall", "-Wextra"],
      "libraries": ["-ldl"]
    }
  ]
}
