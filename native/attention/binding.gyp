{
  "targets": [
    {
      "target_name": "attention",
      "sources": ["attention.c"],
      "cflags": ["-std=gnu11", "-O3", "-Wall", "-Wextra", "-fopenmp", "-fno-math-errno"],
      "ldflags": ["-fopenmp"]
    }
  ]
}
