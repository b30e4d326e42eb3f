{
  "targets": [
    {
      "target_name": "ort",
      "sources": ["ort.c"],
      "cflags": ["-std=gnu11", "-O3", "-Wall", "-Wextra", "-Wno-unused-function", "-fopenmp", "-fno-math-errno"],
      "ldflags": ["-fopenmp"],
      "libraries": ["-ldl"]
    }
  ]
}
