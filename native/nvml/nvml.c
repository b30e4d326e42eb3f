// NVML reader for Tally: dlopen()s libnvidia-ml.so.1 at run time, so it builds without CUDA or a
// driver and loads everywhere; open() says why when the library or a GPU is not there.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>
#include <node_api.h>

// The parts of NVML's public ABI (nvml.h) used here.
typedef int nvmlReturn_t; // NVML_SUCCESS = 0
typedef struct nvmlDevice_st *nvmlDevice_t;
typedef struct { unsigned int gpu; unsigned int memory; } nvmlUtilization_t;                 // percent
typedef struct { unsigned long long total; unsigned long long free; unsigned long long used; } nvmlMemory_t; // bytes
#define NVML_DEVICE_NAME_V2_BUFFER_SIZE 96

static struct {
  void *lib;
  int initialized;
  nvmlReturn_t (*init)(void);
  nvmlReturn_t (*shutdown)(void);
  nvmlReturn_t (*getCount)(unsigned int *);
  nvmlReturn_t (*getHandle)(unsigned int, nvmlDevice_t *);
  nvmlReturn_t (*getName)(nvmlDevice_t, char *, unsigned int);
  nvmlReturn_t (*getUtilization)(nvmlDevice_t, nvmlUtilization_t *);
  nvmlReturn_t (*getMemory)(nvmlDevice_t, nvmlMemory_t *);
  nvmlReturn_t (*getPower)(nvmlDevice_t, unsigned int *);                // milliwatts
  nvmlReturn_t (*getEnergy)(nvmlDevice_t, unsigned long long *);         // millijoules since the driver loaded
  const char *(*errorString)(nvmlReturn_t);                              // optional
} nv;

#define CHECK(env, call)                                                  \
  do {                                                                    \
    if ((call) != napi_ok) {                                              \
      napi_throw_error((env), NULL, "nvml addon: N-API call failed: " #call); \
      return NULL;                                                        \
    }                                                                     \
  } while (0)

static const char *nvml_error(nvmlReturn_t code) {
  static char buf[48];
  if (nv.errorString) return nv.errorString(code);
  snprintf(buf, sizeof buf, "NVML error %d", code);
  return buf;
}

static napi_value make_string(napi_env env, const char *s) {
  napi_value v;
  if (napi_create_string_utf8(env, s, NAPI_AUTO_LENGTH, &v) != napi_ok) return NULL;
  return v;
}

static napi_value make_number(napi_env env, double d) {
  napi_value v;
  if (napi_create_double(env, d, &v) != napi_ok) return NULL;
  return v;
}

static napi_value open_failed(napi_env env, const char *reason) {
  napi_value out, f;
  CHECK(env, napi_create_object(env, &out));
  CHECK(env, napi_get_boolean(env, 0, &f));
  CHECK(env, napi_set_named_property(env, out, "ok", f));
  CHECK(env, napi_set_named_property(env, out, "reason", make_string(env, reason)));
  return out;
}

static void unload(void) {
  if (nv.initialized && nv.shutdown) nv.shutdown();
  if (nv.lib) dlclose(nv.lib);
  memset(&nv, 0, sizeof nv);
}

// open(): {ok: true, count} | {ok: false, reason}. Idempotent.
static napi_value Open(napi_env env, napi_callback_info info) {
  (void)info;
  char reason[512];
  if (!nv.initialized) {
    unload();
    nv.lib = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!nv.lib) {
      const char *err = dlerror();
      snprintf(reason, sizeof reason, "libnvidia-ml.so.1 could not be loaded (%s): the NVIDIA driver is not installed here, or not mounted into this container", err ? err : "unknown error");
      return open_failed(env, reason);
    }
    struct { void **slot; const char *name; } syms[] = {
      {(void **)&nv.init, "nvmlInit_v2"},
      {(void **)&nv.shutdown, "nvmlShutdown"},
      {(void **)&nv.getCount, "nvmlDeviceGetCount_v2"},
      {(void **)&nv.getHandle, "nvmlDeviceGetHandleByIndex_v2"},
      {(void **)&nv.getName, "nvmlDeviceGetName"},
      {(void **)&nv.getUtilization, "nvmlDeviceGetUtilizationRates"},
      {(void **)&nv.getMemory, "nvmlDeviceGetMemoryInfo"},
      {(void **)&nv.getPower, "nvmlDeviceGetPowerUsage"},
      {(void **)&nv.getEnergy, "nvmlDeviceGetTotalEnergyConsumption"},
    };
    for (size_t i = 0; i < sizeof syms / sizeof syms[0]; i++) {
      *syms[i].slot = dlsym(nv.lib, syms[i].name);
      if (!*syms[i].slot) {
        snprintf(reason, sizeof reason, "libnvidia-ml.so.1 lacks %s: the NVIDIA driver is too old", syms[i].name);
        unload();
        return open_failed(env, reason);
      }
    }
    *(void **)&nv.errorString = dlsym(nv.lib, "nvmlErrorString");
    nvmlReturn_t r = nv.init();
    if (r != 0) {
      snprintf(reason, sizeof reason, "nvmlInit failed: %s", nvml_error(r));
      unload();
      return open_failed(env, reason);
    }
    nv.initialized = 1;
  }
  unsigned int count = 0;
  nvmlReturn_t r = nv.getCount(&count);
  if (r != 0) {
    snprintf(reason, sizeof reason, "nvmlDeviceGetCount failed: %s", nvml_error(r));
    return open_failed(env, reason);
  }
  napi_value out, t;
  CHECK(env, napi_create_object(env, &out));
  CHECK(env, napi_get_boolean(env, 1, &t));
  CHECK(env, napi_set_named_property(env, out, "ok", t));
  CHECK(env, napi_set_named_property(env, out, "count", make_number(env, count)));
  return out;
}

// close(): nvmlShutdown and dlclose; open() may be called again.
static napi_value Close(napi_env env, napi_callback_info info) {
  (void)info;
  unload();
  napi_value undef;
  CHECK(env, napi_get_undefined(env, &undef));
  return undef;
}

// Sets out[field] to the value, or to null with unavailable[field] = NVML's reason.
static int put(napi_env env, napi_value out, napi_value unavailable, const char *field, nvmlReturn_t r, double value) {
  napi_value v;
  if (r == 0) return napi_set_named_property(env, out, field, make_number(env, value)) == napi_ok;
  if (napi_get_null(env, &v) != napi_ok || napi_set_named_property(env, out, field, v) != napi_ok) return 0;
  return napi_set_named_property(env, unavailable, field, make_string(env, nvml_error(r))) == napi_ok;
}

// sample(index): {name, utilizationGpu, utilizationMemory (percent), memoryUsedBytes, memoryTotalBytes,
// powerWatts, energyJoules, unavailable: {field: reason}}; a figure NVML cannot give is null.
static napi_value Sample(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  CHECK(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  uint32_t index;
  if (argc < 1 || napi_get_value_uint32(env, argv[0], &index) != napi_ok) {
    napi_throw_type_error(env, NULL, "sample(index) takes a device index");
    return NULL;
  }
  if (!nv.initialized) {
    napi_throw_error(env, NULL, "NVML is not open: call open() first");
    return NULL;
  }
  nvmlDevice_t dev;
  nvmlReturn_t r = nv.getHandle(index, &dev);
  if (r != 0) {
    char msg[256];
    snprintf(msg, sizeof msg, "no NVML device %u: %s", index, nvml_error(r));
    napi_throw_range_error(env, NULL, msg);
    return NULL;
  }
  napi_value out, unavailable;
  CHECK(env, napi_create_object(env, &out));
  CHECK(env, napi_create_object(env, &unavailable));

  char name[NVML_DEVICE_NAME_V2_BUFFER_SIZE] = {0};
  r = nv.getName(dev, name, sizeof name);
  CHECK(env, napi_set_named_property(env, out, "name", make_string(env, r == 0 ? name : "unknown NVIDIA GPU")));

  nvmlUtilization_t util = {0, 0};
  r = nv.getUtilization(dev, &util);
  if (!put(env, out, unavailable, "utilizationGpu", r, util.gpu)) return NULL;
  if (!put(env, out, unavailable, "utilizationMemory", r, util.memory)) return NULL;

  nvmlMemory_t mem = {0, 0, 0};
  r = nv.getMemory(dev, &mem);
  if (!put(env, out, unavailable, "memoryUsedBytes", r, (double)mem.used)) return NULL;
  if (!put(env, out, unavailable, "memoryTotalBytes", r, (double)mem.total)) return NULL;

  unsigned int mw = 0;
  r = nv.getPower(dev, &mw);
  if (!put(env, out, unavailable, "powerWatts", r, mw / 1000.0)) return NULL;

  unsigned long long mj = 0;
  r = nv.getEnergy(dev, &mj);
  if (!put(env, out, unavailable, "energyJoules", r, (double)mj / 1000.0)) return NULL;

  CHECK(env, napi_set_named_property(env, out, "unavailable", unavailable));
  return out;
}

static napi_value Init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
    {"open", NULL, Open, NULL, NULL, NULL, napi_enumerable, NULL},
    {"close", NULL, Close, NULL, NULL, NULL, napi_enumerable, NULL},
    {"sample", NULL, Sample, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  CHECK(env, napi_define_properties(env, exports, sizeof props / sizeof props[0], props));
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, Init)
