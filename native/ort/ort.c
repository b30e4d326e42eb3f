// ONNX Runtime through its C API, for the native runner (src/engine/runners/native-runner.ts).
//
// The library is opened at run time (dlopen): onnxruntime-node's own libonnxruntime.so.1 by default, or any other
// build (a CUDA one) named by the caller. No package ships ONNX Runtime's C headers, so the part of the API
// used here is declared below from the public header's documented order (an ABI fact: the OrtApi table only ever
// grows at its end).
//
// Exports:
//   load(path[, apiVersion[, pool]]) -> { version, apiVersion, providers, pool }: opens the library once per
//     process; pool { threads, spin }: the env gets one intra-op thread pool of that size (the first load decides).
//   claimPool() -> boolean: true where the env has a pool that no live session runs on and no other caller claimed:
//     the caller's sessions may share it (released with the last of them).
//   createSession(bytes, options) -> session: options { threads, spin, shared, externalDir, device: 'cpu' | 'cuda',
//     deviceId }; shared: run on the env's pool (threads and spin are then the pool's).
//   sessionNames(session) -> { inputs, outputs }.
//   sessionRun(session, inputs, outputs) -> seconds: [name, typed array, dims][] each, or [name, buffer, dims,
//     byteOffset, type] for memory from allocate(); outputs are written where given (bound once per call through
//     an OrtIoBinding; no copy); timed until the device has finished (CUDA: outputs synchronized).
//   sessionRunAsync(session, inputs, outputs) -> Promise<seconds>: the same run on a libuv pool thread.
//   allocate(session, bytes) -> buffer: memory from the session's allocator where it runs (device memory on
//     CUDA), e.g. a KV cache bound as a past and a present value of every pass, never copied to the host.
//   createStepper(sessions, dims, cos, sin) -> stepper: a whole forward pass of a Tally graph cut at its
//     attention (buildLlamaParts), the attention of native/attention between the parts, over a paged KV cache
//     kept here. dims: Int32Array [layers, hidden, heads, kv_heads, head_dim, vocab, pages, kvHalf, graphHalf,
//     threads].
//   stepperRun(stepper, B, N, k, full, ids, rows, table, logits, topLogits, topIds) -> Promise<seconds>: runs off
//     the event loop. ids Int32Array [N]: the B rows' new tokens packed one row after another (rows of any
//     lengths, a prompt chunk beside single decode tokens, no padding); rows / table as attend() takes them
//     (native/attention), the rows' token counts adding up to N; full: the rows' logits into `logits` [B, vocab];
//     else their k largest into topLogits / topIds [B, k].
//   stepperRunSync(...same) -> seconds: the same pass on the calling thread.
//   release(session | stepper | buffer): a session after its buffers.
//   pagePositions, kernels.
#include <node_api.h>
// attention.c is compiled in whole (its kernels and run_layer); its own module registration is not.
#undef NAPI_MODULE
#define NAPI_MODULE(modname, regfunc)
#include "../attention/attention.c"

#include <dlfcn.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <time.h>

// ---- The C API, as onnxruntime_c_api.h declares it (ORT_API_VERSION 13, ONNX Runtime 1.13; entries up to
// ReleaseCUDAProviderOptions, index 208, are unchanged since API 11). Entries not called here are kept as slots.

#define TALLY_ORT_API_VERSION 13

typedef struct OrtStatus OrtStatus;
typedef struct OrtEnv OrtEnv;
typedef struct OrtSession OrtSession;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtValue OrtValue;
typedef struct OrtMemoryInfo OrtMemoryInfo;
typedef struct OrtIoBinding OrtIoBinding;
typedef struct OrtRunOptions OrtRunOptions;
typedef struct OrtTensorTypeAndShapeInfo OrtTensorTypeAndShapeInfo;
typedef struct OrtCUDAProviderOptionsV2 OrtCUDAProviderOptionsV2;
typedef struct OrtThreadingOptions OrtThreadingOptions;

enum { ELEM_FLOAT = 1, ELEM_UINT16 = 4, ELEM_INT32 = 6, ELEM_INT64 = 7, ELEM_FLOAT16 = 10 };
enum { LOG_ERROR = 3 };
enum { ORT_SEQUENTIAL = 0 };
enum { ORT_ENABLE_ALL = 99 };
enum { OrtDeviceAllocator = 0, OrtArenaAllocator = 1 };
enum { OrtMemTypeDefault = 0 };

typedef struct OrtAllocator {
  uint32_t version;
  void *(*Alloc)(struct OrtAllocator *self, size_t size);
  void (*Free)(struct OrtAllocator *self, void *p);
  const OrtMemoryInfo *(*Info)(const struct OrtAllocator *self);
} OrtAllocator;

#define SLOTS(from, to) void *slots_##from##_##to[(to) - (from) + 1]

typedef struct OrtApi {
  SLOTS(0, 1);
  const char *(*GetErrorMessage)(const OrtStatus *status);                                                            // 2
  OrtStatus *(*CreateEnv)(int level, const char *logid, OrtEnv **out);                                                // 3
  SLOTS(4, 7);
  OrtStatus *(*CreateSessionFromArray)(const OrtEnv *env, const void *data, size_t length, const OrtSessionOptions *options, OrtSession **out); // 8
  SLOTS(9, 9);
  OrtStatus *(*CreateSessionOptions)(OrtSessionOptions **out);                                                        // 10
  SLOTS(11, 12);
  OrtStatus *(*SetSessionExecutionMode)(OrtSessionOptions *options, int mode);                                        // 13
  SLOTS(14, 21);
  OrtStatus *(*SetSessionLogSeverityLevel)(OrtSessionOptions *options, int level);                                    // 22
  OrtStatus *(*SetSessionGraphOptimizationLevel)(OrtSessionOptions *options, int level);                              // 23
  OrtStatus *(*SetIntraOpNumThreads)(OrtSessionOptions *options, int n);                                              // 24
  OrtStatus *(*SetInterOpNumThreads)(OrtSessionOptions *options, int n);                                              // 25
  SLOTS(26, 29);
  OrtStatus *(*SessionGetInputCount)(const OrtSession *session, size_t *out);                                         // 30
  OrtStatus *(*SessionGetOutputCount)(const OrtSession *session, size_t *out);                                        // 31
  SLOTS(32, 35);
  OrtStatus *(*SessionGetInputName)(const OrtSession *session, size_t index, OrtAllocator *allocator, char **out);    // 36
  OrtStatus *(*SessionGetOutputName)(const OrtSession *session, size_t index, OrtAllocator *allocator, char **out);   // 37
  SLOTS(38, 48);
  OrtStatus *(*CreateTensorWithDataAsOrtValue)(const OrtMemoryInfo *info, void *data, size_t bytes, const int64_t *shape, size_t rank, int type, OrtValue **out); // 49
  SLOTS(50, 50);
  OrtStatus *(*GetTensorMutableData)(OrtValue *value, void **out);                                                    // 51
  SLOTS(52, 60);
  OrtStatus *(*GetDimensionsCount)(const OrtTensorTypeAndShapeInfo *info, size_t *out);                               // 61
  OrtStatus *(*GetDimensions)(const OrtTensorTypeAndShapeInfo *info, int64_t *dims, size_t n);                        // 62
  SLOTS(63, 64);
  OrtStatus *(*GetTensorTypeAndShape)(const OrtValue *value, OrtTensorTypeAndShapeInfo **out);                        // 65
  SLOTS(66, 67);
  OrtStatus *(*CreateMemoryInfo)(const char *name, int type, int id, int memType, OrtMemoryInfo **out);               // 68
  OrtStatus *(*CreateCpuMemoryInfo)(int type, int memType, OrtMemoryInfo **out);                                      // 69
  SLOTS(70, 74);
  OrtStatus *(*AllocatorAlloc)(OrtAllocator *allocator, size_t size, void **out);                                     // 75
  OrtStatus *(*AllocatorFree)(OrtAllocator *allocator, void *p);                                                      // 76
  SLOTS(77, 77);
  OrtStatus *(*GetAllocatorWithDefaultOptions)(OrtAllocator **out);                                                   // 78
  SLOTS(79, 91);
  void (*ReleaseEnv)(OrtEnv *env);                                                                                    // 92
  void (*ReleaseStatus)(OrtStatus *status);                                                                           // 93
  void (*ReleaseMemoryInfo)(OrtMemoryInfo *info);                                                                     // 94
  void (*ReleaseSession)(OrtSession *session);                                                                        // 95
  void (*ReleaseValue)(OrtValue *value);                                                                              // 96
  SLOTS(97, 98);
  void (*ReleaseTensorTypeAndShapeInfo)(OrtTensorTypeAndShapeInfo *info);                                             // 99
  void (*ReleaseSessionOptions)(OrtSessionOptions *options);                                                          // 100
  SLOTS(101, 118);
  OrtStatus *(*CreateEnvWithGlobalThreadPools)(int level, const char *logid, const OrtThreadingOptions *threading, OrtEnv **out); // 119
  OrtStatus *(*DisablePerSessionThreads)(OrtSessionOptions *options);                                                 // 120
  OrtStatus *(*CreateThreadingOptions)(OrtThreadingOptions **out);                                                    // 121
  void (*ReleaseThreadingOptions)(OrtThreadingOptions *threading);                                                    // 122
  SLOTS(123, 124);
  OrtStatus *(*GetAvailableProviders)(char ***out, int *length);                                                      // 125
  OrtStatus *(*ReleaseAvailableProviders)(char **ptr, int length);                                                    // 126
  SLOTS(127, 129);
  OrtStatus *(*AddSessionConfigEntry)(OrtSessionOptions *options, const char *key, const char *value);                // 130
  OrtStatus *(*CreateAllocator)(const OrtSession *session, const OrtMemoryInfo *info, OrtAllocator **out);            // 131
  void (*ReleaseAllocator)(OrtAllocator *allocator);                                                                  // 132
  OrtStatus *(*RunWithBinding)(OrtSession *session, const OrtRunOptions *options, const OrtIoBinding *binding);       // 133
  OrtStatus *(*CreateIoBinding)(OrtSession *session, OrtIoBinding **out);                                             // 134
  void (*ReleaseIoBinding)(OrtIoBinding *binding);                                                                    // 135
  OrtStatus *(*BindInput)(OrtIoBinding *binding, const char *name, const OrtValue *value);                            // 136
  OrtStatus *(*BindOutput)(OrtIoBinding *binding, const char *name, const OrtValue *value);                           // 137
  OrtStatus *(*BindOutputToDevice)(OrtIoBinding *binding, const char *name, const OrtMemoryInfo *info);               // 138
  SLOTS(139, 139);
  OrtStatus *(*GetBoundOutputValues)(const OrtIoBinding *binding, OrtAllocator *allocator, OrtValue ***out, size_t *count); // 140
  void (*ClearBoundInputs)(OrtIoBinding *binding);                                                                    // 141
  void (*ClearBoundOutputs)(OrtIoBinding *binding);                                                                   // 142
  SLOTS(143, 146);
  OrtStatus *(*SetGlobalIntraOpNumThreads)(OrtThreadingOptions *threading, int n);                                    // 147
  OrtStatus *(*SetGlobalInterOpNumThreads)(OrtThreadingOptions *threading, int n);                                    // 148
  OrtStatus *(*SetGlobalSpinControl)(OrtThreadingOptions *threading, int spin);                                       // 149
  SLOTS(150, 201);
  OrtStatus *(*SynchronizeBoundInputs)(OrtIoBinding *binding);                                                        // 202
  OrtStatus *(*SynchronizeBoundOutputs)(OrtIoBinding *binding);                                                       // 203
  OrtStatus *(*SessionOptionsAppendExecutionProvider_CUDA_V2)(OrtSessionOptions *options, const OrtCUDAProviderOptionsV2 *cuda); // 204
  OrtStatus *(*CreateCUDAProviderOptions)(OrtCUDAProviderOptionsV2 **out);                                            // 205
  OrtStatus *(*UpdateCUDAProviderOptions)(OrtCUDAProviderOptionsV2 *cuda, const char *const *keys, const char *const *values, size_t n); // 206
  SLOTS(207, 207);
  void (*ReleaseCUDAProviderOptions)(OrtCUDAProviderOptionsV2 *cuda);                                                 // 208
} OrtApi;

#define AT(member, index) _Static_assert(offsetof(OrtApi, member) == (index) * sizeof(void *), #member " is entry " #index)
AT(GetErrorMessage, 2);
AT(CreateEnv, 3);
AT(CreateSessionFromArray, 8);
AT(CreateSessionOptions, 10);
AT(SetSessionExecutionMode, 13);
AT(SetSessionLogSeverityLevel, 22);
AT(SetInterOpNumThreads, 25);
AT(SessionGetInputCount, 30);
AT(SessionGetInputName, 36);
AT(CreateTensorWithDataAsOrtValue, 49);
AT(GetTensorMutableData, 51);
AT(GetDimensionsCount, 61);
AT(GetTensorTypeAndShape, 65);
AT(CreateMemoryInfo, 68);
AT(AllocatorAlloc, 75);
AT(GetAllocatorWithDefaultOptions, 78);
AT(ReleaseEnv, 92);
AT(ReleaseValue, 96);
AT(ReleaseTensorTypeAndShapeInfo, 99);
AT(ReleaseSessionOptions, 100);
AT(CreateEnvWithGlobalThreadPools, 119);
AT(ReleaseThreadingOptions, 122);
AT(GetAvailableProviders, 125);
AT(AddSessionConfigEntry, 130);
AT(RunWithBinding, 133);
AT(BindInput, 136);
AT(GetBoundOutputValues, 140);
AT(ClearBoundOutputs, 142);
AT(SetGlobalIntraOpNumThreads, 147);
AT(SetGlobalSpinControl, 149);
AT(SynchronizeBoundInputs, 202);
AT(SessionOptionsAppendExecutionProvider_CUDA_V2, 204);
AT(ReleaseCUDAProviderOptions, 208);

typedef struct OrtApiBase {
  const OrtApi *(*GetApi)(uint32_t version);
  const char *(*GetVersionString)(void);
} OrtApiBase;

// ---- the library ----

static const OrtApi *ort;
static OrtEnv *ortEnv;
// The env's one intra-op pool (load's `pool`), or poolThreads 0 where the env has none and sessions keep their own.
// One runner at a time claims it (until its sessions are released): a forward pass cut into a session per layer
// then wakes one pool, not one per layer.
static int poolThreads, poolSpin, poolClaimed, poolSessions;
static OrtMemoryInfo *cpuInfo;
static char ortPath[4096];
static char ortVersion[64];
// Engine workers are threads of one process: each has its own env, all share the library.
static __thread char errorText[1024];
static pthread_mutex_t loadLock = PTHREAD_MUTEX_INITIALIZER;

static napi_value throw_error(napi_env env, const char *msg) {
  napi_throw_error(env, NULL, msg);
  return NULL;
}

// The status's message into `out` (and releases it); 1 when there was an error.
static int failed(OrtStatus *status, char *out, size_t size) {
  if (!status) return 0;
  snprintf(out, size, "%s", ort->GetErrorMessage(status));
  ort->ReleaseStatus(status);
  return 1;
}

#define CHECK_THROW(env, call)                                   \
  do {                                                           \
    if (failed((call), errorText, sizeof errorText)) {           \
      napi_throw_error((env), NULL, errorText);                  \
      goto fail;                                                 \
    }                                                            \
  } while (0)

static napi_value str(napi_env env, const char *s) {
  napi_value v;
  napi_create_string_utf8(env, s, NAPI_AUTO_LENGTH, &v);
  return v;
}

static napi_value loaded_info(napi_env env) {
  napi_value o, providers;
  napi_create_object(env, &o);
  napi_set_named_property(env, o, "version", str(env, ortVersion));
  napi_set_named_property(env, o, "path", str(env, ortPath));
  napi_value api;
  napi_create_int32(env, TALLY_ORT_API_VERSION, &api);
  napi_set_named_property(env, o, "apiVersion", api);
  napi_create_array(env, &providers);
  char **names;
  int n;
  if (!failed(ort->GetAvailableProviders(&names, &n), errorText, sizeof errorText)) {
    for (int i = 0; i < n; i++) napi_set_element(env, providers, (uint32_t)i, str(env, names[i]));
    failed(ort->ReleaseAvailableProviders(names, n), errorText, sizeof errorText);
  }
  napi_set_named_property(env, o, "providers", providers);
  napi_value pool;
  if (poolThreads > 0) {
    napi_value v;
    napi_create_object(env, &pool);
    napi_create_int32(env, poolThreads, &v);
    napi_set_named_property(env, pool, "threads", v);
    napi_get_boolean(env, poolSpin, &v);
    napi_set_named_property(env, pool, "spin", v);
  } else {
    napi_get_null(env, &pool);
  }
  napi_set_named_property(env, o, "pool", pool);
  return o;
}

static napi_value load_locked(napi_env env, const char *path, uint32_t want, int threads, int spin);
static int get_prop_int(napi_env env, napi_value o, const char *name, int fallback);

static napi_value js_load(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  char path[4096];
  size_t len;
  if (argc < 1 || napi_get_value_string_utf8(env, argv[0], path, sizeof path, &len) != napi_ok) return throw_error(env, "load(path) takes the library's path");
  uint32_t want = TALLY_ORT_API_VERSION;
  napi_valuetype type = napi_undefined;
  if (argc > 1) napi_typeof(env, argv[1], &type);
  if (type == napi_number) napi_get_value_uint32(env, argv[1], &want);
  int threads = 0, spin = 0;
  if (argc > 2) napi_typeof(env, argv[2], &type);
  if (argc > 2 && type == napi_object) {
    threads = get_prop_int(env, argv[2], "threads", 0);
    spin = get_prop_int(env, argv[2], "spin", 0);
    if (threads < 1) return throw_error(env, "load(path, apiVersion, pool): pool.threads must be 1 or more");
  }
  pthread_mutex_lock(&loadLock);
  napi_value result = load_locked(env, path, want, threads, spin);
  pthread_mutex_unlock(&loadLock);
  return result;
}

static OrtStatus *create_env(int threads, int spin) {
  if (threads < 1) return ort->CreateEnv(LOG_ERROR, "tally", &ortEnv);
  OrtThreadingOptions *threading = NULL;
  OrtStatus *status = ort->CreateThreadingOptions(&threading);
  if (!status) status = ort->SetGlobalIntraOpNumThreads(threading, threads);
  if (!status) status = ort->SetGlobalInterOpNumThreads(threading, 1);
  if (!status) status = ort->SetGlobalSpinControl(threading, spin);
  if (!status) status = ort->CreateEnvWithGlobalThreadPools(LOG_ERROR, "tally", threading, &ortEnv);
  if (threading) ort->ReleaseThreadingOptions(threading);
  if (!status) {
    poolThreads = threads;
    poolSpin = spin;
  }
  return status;
}

static napi_value load_locked(napi_env env, const char *path, uint32_t want, int threads, int spin) {
  if (ort && strcmp(path, ortPath) != 0) {
    snprintf(errorText, sizeof errorText, "ONNX Runtime is already loaded from %s in this process; %s cannot be loaded beside it", ortPath, path);
    return throw_error(env, errorText);
  }
  void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    snprintf(errorText, sizeof errorText, "cannot open the ONNX Runtime library %s: %s", path, dlerror());
    return throw_error(env, errorText);
  }
  const OrtApiBase *(*getBase)(void) = (const OrtApiBase *(*)(void))dlsym(lib, "OrtGetApiBase");
  if (!getBase) {
    snprintf(errorText, sizeof errorText, "%s is not an ONNX Runtime library (it has no OrtGetApiBase)", path);
    dlclose(lib);
    return throw_error(env, errorText);
  }
  const OrtApiBase *base = getBase();
  const char *version = base->GetVersionString();
  const OrtApi *api = base->GetApi(want);
  if (!api) {
    snprintf(errorText, sizeof errorText,
             "the ONNX Runtime library %s is version %s, which does not offer C API version %u (Tally's native runner is written against it: ONNX Runtime 1.%u or newer); use --runner js or name a newer library with --ort-library",
             path, version, want, want);
    dlclose(lib);
    return throw_error(env, errorText);
  }
  if (ort) {
    dlclose(lib);
    return loaded_info(env);
  }
  ort = api;
  OrtStatus *status = create_env(threads, spin);
  if (!status) status = ort->CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, &cpuInfo);
  if (failed(status, errorText, sizeof errorText)) {
    ort = NULL;
    return throw_error(env, errorText);
  }
  snprintf(ortPath, sizeof ortPath, "%s", path);
  snprintf(ortVersion, sizeof ortVersion, "%s", version);
  return loaded_info(env);
}

// ---- sessions ----

#define MAGIC_SESSION 0x5e55
#define MAGIC_STEPPER 0x57e9
#define MAGIC_BUFFER 0xb0ff

typedef struct {
  int magic;
  OrtSession *session;
  OrtIoBinding *binding;
  OrtMemoryInfo *deviceInfo; // CUDA: where outputs left on the device live; NULL on the CPU
  int deviceId;
  int buffers; // live buffers from its allocator: they must go before it does
  int busy;    // a run of its binding is in flight
  int released;
  int shared; // runs on the env's pool
} Session;

// Memory from a session's own allocator, where the session runs (device memory on CUDA): a KV cache that stays on
// the device between passes. It holds a reference to its session, whose allocator it came from.
typedef struct {
  int magic;
  Session *owner;
  napi_ref ownerRef;
  OrtAllocator *allocator;
  OrtMemoryInfo *info;
  void *data;
  size_t bytes;
  int released;
} Buffer;

static void session_free(Session *s) {
  if (s->released) return;
  s->released = 1;
  if (s->binding) ort->ReleaseIoBinding(s->binding);
  if (s->session) ort->ReleaseSession(s->session);
  if (s->deviceInfo) ort->ReleaseMemoryInfo(s->deviceInfo);
  if (s->shared) {
    pthread_mutex_lock(&loadLock);
    if (--poolSessions == 0) poolClaimed = 0;
    pthread_mutex_unlock(&loadLock);
  }
}

// Steps running on pool threads now. A worker thread that is torn down mid-step finalizes its objects while the
// step still runs; finalizers wait for it.
static int executingSteps;

static void wait_for_steps(void) {
  const struct timespec ms = {0, 1000000};
  while (__atomic_load_n(&executingSteps, __ATOMIC_ACQUIRE) > 0) nanosleep(&ms, NULL);
}

static void session_finalize(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  wait_for_steps();
  session_free(data);
  free(data);
}

static int get_prop_int(napi_env env, napi_value o, const char *name, int fallback) {
  napi_value v;
  bool has;
  int32_t n;
  if (napi_has_named_property(env, o, name, &has) != napi_ok || !has) return fallback;
  napi_get_named_property(env, o, name, &v);
  return napi_get_value_int32(env, v, &n) == napi_ok ? n : fallback;
}

static int get_prop_string(napi_env env, napi_value o, const char *name, char *out, size_t size) {
  napi_value v;
  bool has;
  size_t len;
  if (napi_has_named_property(env, o, name, &has) != napi_ok || !has) return 0;
  napi_get_named_property(env, o, name, &v);
  return napi_get_value_string_utf8(env, v, out, size, &len) == napi_ok;
}

static napi_value js_create_session(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (!ort) return throw_error(env, "load() the ONNX Runtime library first");
  void *bytes;
  size_t length;
  if (argc < 2 || !typed(env, argv[0], napi_uint8_array, &bytes, &length)) return throw_error(env, "createSession(bytes: Uint8Array, options)");
  const int threads = get_prop_int(env, argv[1], "threads", 0);
  const int spin = get_prop_int(env, argv[1], "spin", 0);
  const int shared = get_prop_int(env, argv[1], "shared", 0);
  if (shared && poolThreads < 1) return throw_error(env, "createSession: shared asks for the env's thread pool, and load() made none");
  const int deviceId = get_prop_int(env, argv[1], "deviceId", 0);
  char externalDir[4096] = "", device[16] = "cpu";
  get_prop_string(env, argv[1], "externalDir", externalDir, sizeof externalDir);
  get_prop_string(env, argv[1], "device", device, sizeof device);

  OrtSessionOptions *options = NULL;
  OrtCUDAProviderOptionsV2 *cuda = NULL;
  Session *s = calloc(1, sizeof *s);
  s->magic = MAGIC_SESSION;
  CHECK_THROW(env, ort->CreateSessionOptions(&options));
  CHECK_THROW(env, ort->SetSessionGraphOptimizationLevel(options, ORT_ENABLE_ALL));
  CHECK_THROW(env, ort->SetSessionExecutionMode(options, ORT_SEQUENTIAL));
  if (shared) CHECK_THROW(env, ort->DisablePerSessionThreads(options));
  else CHECK_THROW(env, ort->SetIntraOpNumThreads(options, threads));
  CHECK_THROW(env, ort->SetInterOpNumThreads(options, 1));
  CHECK_THROW(env, ort->SetSessionLogSeverityLevel(options, LOG_ERROR));
  CHECK_THROW(env, ort->AddSessionConfigEntry(options, "session.intra_op.allow_spinning", spin ? "1" : "0"));
  if (externalDir[0]) CHECK_THROW(env, ort->AddSessionConfigEntry(options, "session.model_external_initializers_file_folder_path", externalDir));
  if (strcmp(device, "cuda") == 0) {
    char id[16];
    snprintf(id, sizeof id, "%d", deviceId);
    const char *keys[] = {"device_id"};
    const char *values[] = {id};
    CHECK_THROW(env, ort->CreateCUDAProviderOptions(&cuda));
    CHECK_THROW(env, ort->UpdateCUDAProviderOptions(cuda, keys, values, 1));
    CHECK_THROW(env, ort->SessionOptionsAppendExecutionProvider_CUDA_V2(options, cuda));
    CHECK_THROW(env, ort->CreateMemoryInfo("Cuda", OrtDeviceAllocator, deviceId, OrtMemTypeDefault, &s->deviceInfo));
    s->deviceId = deviceId;
  } else if (strcmp(device, "cpu") != 0) {
    napi_throw_error(env, NULL, "device must be cpu or cuda");
    goto fail;
  }
  if (failed(ort->CreateSessionFromArray(ortEnv, bytes, length, options, &s->session), errorText, sizeof errorText)) {
    // ONNX Runtime keeps one env per process: one made before load() (onnxruntime-node's) is the one load() got.
    if (shared && strstr(errorText, "EnvCreatedWithGlobalThreadPools")) {
      poolThreads = 0;
      snprintf(errorText, sizeof errorText, "createSession: the process's ONNX Runtime env was made before load() asked for a thread pool (by onnxruntime-node), so it has none to share");
    }
    napi_throw_error(env, NULL, errorText);
    goto fail;
  }
  CHECK_THROW(env, ort->CreateIoBinding(s->session, &s->binding));
  if (shared) {
    pthread_mutex_lock(&loadLock);
    s->shared = 1;
    poolSessions++;
    pthread_mutex_unlock(&loadLock);
  }
  ort->ReleaseSessionOptions(options);
  if (cuda) ort->ReleaseCUDAProviderOptions(cuda);
  napi_value result;
  napi_create_external(env, s, session_finalize, NULL, &result);
  return result;
fail:
  if (options) ort->ReleaseSessionOptions(options);
  if (cuda) ort->ReleaseCUDAProviderOptions(cuda);
  session_free(s);
  free(s);
  return NULL;
}

static void *unwrap(napi_env env, napi_value v, int magic) {
  void *p = NULL;
  napi_valuetype t;
  if (napi_typeof(env, v, &t) != napi_ok || t != napi_external || napi_get_value_external(env, v, &p) != napi_ok || !p || *(int *)p != magic) return NULL;
  return p;
}

static napi_value js_session_names(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  Session *s = argc == 1 ? unwrap(env, argv[0], MAGIC_SESSION) : NULL;
  if (!s || s->released) return throw_error(env, "sessionNames(session) takes a live session");
  OrtAllocator *allocator;
  napi_value result, inputs, outputs;
  napi_create_object(env, &result);
  napi_create_array(env, &inputs);
  napi_create_array(env, &outputs);
  size_t n;
  char *name;
  CHECK_THROW(env, ort->GetAllocatorWithDefaultOptions(&allocator));
  CHECK_THROW(env, ort->SessionGetInputCount(s->session, &n));
  for (size_t i = 0; i < n; i++) {
    CHECK_THROW(env, ort->SessionGetInputName(s->session, i, allocator, &name));
    napi_set_element(env, inputs, (uint32_t)i, str(env, name));
    failed(ort->AllocatorFree(allocator, name), errorText, sizeof errorText);
  }
  CHECK_THROW(env, ort->SessionGetOutputCount(s->session, &n));
  for (size_t i = 0; i < n; i++) {
    CHECK_THROW(env, ort->SessionGetOutputName(s->session, i, allocator, &name));
    napi_set_element(env, outputs, (uint32_t)i, str(env, name));
    failed(ort->AllocatorFree(allocator, name), errorText, sizeof errorText);
  }
  napi_set_named_property(env, result, "inputs", inputs);
  napi_set_named_property(env, result, "outputs", outputs);
  return result;
fail:
  return NULL;
}

// An OrtValue over a typed array's memory, entry [name, array, dims], or over a buffer's (allocate()), entry
// [name, buffer, dims, byteOffset, 'float32' | 'float16' | 'int32' | 'int64'].
static int tensor_of(napi_env env, napi_value entry, char *name, size_t nameSize, OrtValue **out) {
  napi_value nameV, arr, dimsV;
  napi_get_element(env, entry, 0, &nameV);
  napi_get_element(env, entry, 1, &arr);
  napi_get_element(env, entry, 2, &dimsV);
  size_t len;
  if (napi_get_value_string_utf8(env, nameV, name, nameSize, &len) != napi_ok) return 0;
  int64_t dims[8];
  uint32_t rank;
  if (napi_get_array_length(env, dimsV, &rank) != napi_ok || rank > 8) return 0;
  size_t elements = 1;
  for (uint32_t i = 0; i < rank; i++) {
    napi_value d;
    napi_get_element(env, dimsV, i, &d);
    napi_get_value_int64(env, d, &dims[i]);
    if (dims[i] < 0) return 0;
    elements *= (size_t)dims[i];
  }
  Buffer *b = unwrap(env, arr, MAGIC_BUFFER);
  if (b) {
    if (b->released) return 0;
    napi_value offsetV, typeV;
    int64_t offset;
    char type[16];
    napi_get_element(env, entry, 3, &offsetV);
    napi_get_element(env, entry, 4, &typeV);
    if (napi_get_value_int64(env, offsetV, &offset) != napi_ok || offset < 0) return 0;
    if (napi_get_value_string_utf8(env, typeV, type, sizeof type, &len) != napi_ok) return 0;
    int elem;
    size_t esize;
    if (strcmp(type, "float32") == 0) elem = ELEM_FLOAT, esize = 4;
    else if (strcmp(type, "float16") == 0) elem = ELEM_FLOAT16, esize = 2;
    else if (strcmp(type, "int32") == 0) elem = ELEM_INT32, esize = 4;
    else if (strcmp(type, "int64") == 0) elem = ELEM_INT64, esize = 8;
    else return 0;
    if ((size_t)offset + elements * esize > b->bytes) return 0;
    return !failed(ort->CreateTensorWithDataAsOrtValue(b->info, (char *)b->data + offset, elements * esize, dims, rank, elem, out), errorText, sizeof errorText) ? 1 : -1;
  }
  bool is;
  if (napi_is_typedarray(env, arr, &is) != napi_ok || !is) return 0;
  napi_typedarray_type type;
  size_t count, offset;
  void *data;
  napi_value buf;
  napi_get_typedarray_info(env, arr, &type, &count, &data, &buf, &offset);
  int elem;
  size_t esize;
  switch (type) {
    case napi_float32_array: elem = ELEM_FLOAT; esize = 4; break;
    case napi_int32_array: elem = ELEM_INT32; esize = 4; break;
    case napi_bigint64_array: elem = ELEM_INT64; esize = 8; break;
    case napi_uint16_array: elem = ELEM_FLOAT16; esize = 2; break;
    default: return 0;
  }
  if (elements > count) return 0;
  return !failed(ort->CreateTensorWithDataAsOrtValue(cpuInfo, data, count * esize, dims, rank, elem, out), errorText, sizeof errorText) ? 1 : -1;
}

static double now_seconds(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

// One run of a session's binding: the values bound, and for a run off the event loop its promise and the arrays
// it holds on to.
// A whole-model graph binds a past and a present value per layer and kind: four per layer.
#define RUN_VALUES 1024

typedef struct {
  Session *s;
  OrtValue *values[RUN_VALUES];
  int nvalues;
  napi_ref held[3]; // the session and the arrays, while the run is in flight
  napi_deferred deferred;
  napi_async_work work;
  double seconds;
  char error[1024];
} Run;

static void run_free(napi_env env, Run *r) {
  ort->ClearBoundInputs(r->s->binding);
  ort->ClearBoundOutputs(r->s->binding);
  for (int i = 0; i < r->nvalues; i++) ort->ReleaseValue(r->values[i]);
  for (int i = 0; i < 3; i++)
    if (r->held[i]) napi_delete_reference(env, r->held[i]);
  r->s->busy = 0;
  free(r);
}

// Binds sessionRun's inputs and outputs; NULL (an exception pending) when an entry is wrong.
static Run *run_bind(napi_env env, napi_value *argv) {
  Session *s = unwrap(env, argv[0], MAGIC_SESSION);
  if (!s || s->released) return throw_error(env, "sessionRun(session, inputs, outputs) takes a live session");
  if (s->busy) return throw_error(env, "the session is already running");
  Run *r = calloc(1, sizeof *r);
  r->s = s;
  s->busy = 1;
  char name[256];
  ort->ClearBoundInputs(s->binding);
  ort->ClearBoundOutputs(s->binding);
  for (int side = 0; side < 2; side++) {
    uint32_t n;
    napi_get_array_length(env, argv[1 + side], &n);
    if (n > RUN_VALUES - (uint32_t)r->nvalues) {
      napi_throw_error(env, NULL, "sessionRun takes at most 1024 inputs and outputs");
      goto fail;
    }
    for (uint32_t i = 0; i < n; i++) {
      napi_value entry;
      napi_get_element(env, argv[1 + side], i, &entry);
      const int ok = tensor_of(env, entry, name, sizeof name, &r->values[r->nvalues]);
      if (ok <= 0) {
        if (ok == 0)
          snprintf(errorText, sizeof errorText, "%s %u must be [name, Float32Array | Int32Array | BigInt64Array | Uint16Array (float16), dims] or [name, buffer, dims, byteOffset, type], its dims within the array", side ? "output" : "input", i);
        napi_throw_error(env, NULL, errorText);
        goto fail;
      }
      r->nvalues++;
      CHECK_THROW(env, side ? ort->BindOutput(s->binding, name, r->values[r->nvalues - 1]) : ort->BindInput(s->binding, name, r->values[r->nvalues - 1]));
    }
  }
  return r;
fail:
  run_free(env, r);
  return NULL;
}

// The run, timed until the device has finished it (on CUDA the outputs are synchronized first).
static void run_execute_on(Run *r) {
  const double started = now_seconds();
  if (!failed(ort->RunWithBinding(r->s->session, NULL, r->s->binding), r->error, sizeof r->error) && r->s->deviceInfo)
    failed(ort->SynchronizeBoundOutputs(r->s->binding), r->error, sizeof r->error);
  r->seconds = now_seconds() - started;
}

static napi_value js_session_run(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc != 3) return throw_error(env, "sessionRun(session, inputs, outputs)");
  Run *r = run_bind(env, argv);
  if (!r) return NULL;
  run_execute_on(r);
  napi_value result = NULL;
  if (r->error[0]) napi_throw_error(env, NULL, r->error);
  else napi_create_double(env, r->seconds, &result);
  run_free(env, r);
  return result;
}

static void run_execute(napi_env env, void *data) {
  (void)env;
  __atomic_add_fetch(&executingSteps, 1, __ATOMIC_ACQ_REL);
  run_execute_on(data);
  __atomic_sub_fetch(&executingSteps, 1, __ATOMIC_ACQ_REL);
}

static void run_complete(napi_env env, napi_status status, void *data) {
  Run *r = data;
  napi_delete_async_work(env, r->work);
  if (status != napi_ok && !r->error[0]) snprintf(r->error, sizeof r->error, "the run was cancelled");
  napi_value value;
  if (r->error[0]) {
    napi_value message;
    napi_create_string_utf8(env, r->error, NAPI_AUTO_LENGTH, &message);
    napi_create_error(env, NULL, message, &value);
    napi_reject_deferred(env, r->deferred, value);
  } else {
    napi_create_double(env, r->seconds, &value);
    napi_resolve_deferred(env, r->deferred, value);
  }
  run_free(env, r);
}

// sessionRunAsync(session, inputs, outputs) -> Promise<seconds>: the same run on a libuv pool thread.
static napi_value js_session_run_async(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc != 3) return throw_error(env, "sessionRunAsync(session, inputs, outputs)");
  Run *r = run_bind(env, argv);
  if (!r) return NULL;
  for (int i = 0; i < 3; i++) napi_create_reference(env, argv[i], 1, &r->held[i]);
  napi_value promise, name;
  napi_create_promise(env, &r->deferred, &promise);
  napi_create_string_utf8(env, "tally.run", NAPI_AUTO_LENGTH, &name);
  napi_create_async_work(env, NULL, name, run_execute, run_complete, r, &r->work);
  napi_queue_async_work(env, r->work);
  return promise;
}

// ---- buffers ----

static void buffer_free(napi_env env, Buffer *b) {
  if (b->released) return;
  b->released = 1;
  if (b->data) failed(ort->AllocatorFree(b->allocator, b->data), errorText, sizeof errorText);
  if (b->allocator) ort->ReleaseAllocator(b->allocator);
  if (b->info) ort->ReleaseMemoryInfo(b->info);
  if (b->owner) b->owner->buffers--;
  if (b->ownerRef) napi_delete_reference(env, b->ownerRef);
}

static void buffer_finalize(napi_env env, void *data, void *hint) {
  (void)hint;
  wait_for_steps();
  buffer_free(env, data);
  free(data);
}

// allocate(session, bytes) -> buffer: memory from the session's allocator where it runs (CUDA: device memory),
// not initialised (on the CPU its pages take memory only once written).
static napi_value js_allocate(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  Session *s = argc == 2 ? unwrap(env, argv[0], MAGIC_SESSION) : NULL;
  int64_t bytes;
  if (!s || s->released || napi_get_value_int64(env, argv[1], &bytes) != napi_ok || bytes <= 0) return throw_error(env, "allocate(session, bytes) takes a live session and a positive size");
  Buffer *b = calloc(1, sizeof *b);
  b->magic = MAGIC_BUFFER;
  b->bytes = (size_t)bytes;
  if (s->deviceInfo) CHECK_THROW(env, ort->CreateMemoryInfo("Cuda", OrtDeviceAllocator, s->deviceId, OrtMemTypeDefault, &b->info));
  else CHECK_THROW(env, ort->CreateCpuMemoryInfo(OrtDeviceAllocator, OrtMemTypeDefault, &b->info));
  CHECK_THROW(env, ort->CreateAllocator(s->session, b->info, &b->allocator));
  CHECK_THROW(env, ort->AllocatorAlloc(b->allocator, b->bytes, &b->data));
  if (!b->data) {
    napi_throw_error(env, NULL, "out of memory for a buffer");
    goto fail;
  }
  b->owner = s;
  s->buffers++;
  napi_create_reference(env, argv[0], 1, &b->ownerRef);
  napi_value result;
  napi_create_external(env, b, buffer_finalize, NULL, &result);
  return result;
fail:
  buffer_free(env, b);
  free(b);
  return NULL;
}

// ---- the stepper: a whole forward pass ----

typedef struct {
  OrtValue *values[8];
  int count;
} Bound;

typedef struct {
  int magic;
  int layers, H, nh, kvh, hd, V, totalPages, kvHalf, graphHalf, threads;
  int qkvWidth;
  Session **parts;
  napi_ref *partRefs;
  void **arenas;
  float *cos, *sin;
  size_t ropePositions;
  // Buffers grown to the largest step so far.
  size_t capRows, capBatch;
  void *hidden[2], *qkv, *attnGraph;
  float *qkv32, *attn32;
  int64_t *ids64, *logitsIndex, *topIds64, topK;
  int32_t *tokenStart;
  // What the bindings were made for; they are made again when any of it changes.
  int boundB, boundN, boundK, boundFull;
  void *boundLogits, *boundTop, *boundHidden;
  Bound *bound;
  // One step's arguments and result.
  int B, N, k, full;
  const int32_t *ids, *rows, *table;
  float *logits, *topLogits;
  int32_t *topIds;
  napi_ref argRefs[6];
  napi_deferred deferred;
  napi_async_work work;
  int busy, released;
  double seconds;
  char error[1024];
} Stepper;

static void unbind(Stepper *st) {
  if (!st->bound) return;
  for (int p = 0; p <= st->layers; p++) {
    ort->ClearBoundInputs(st->parts[p]->binding);
    ort->ClearBoundOutputs(st->parts[p]->binding);
    for (int i = 0; i < st->bound[p].count; i++) ort->ReleaseValue(st->bound[p].values[i]);
    st->bound[p].count = 0;
  }
  st->boundB = -1;
}

// Frees what the stepper owns. With an env, also drops its hold on the sessions (after unbinding them); from a
// finalizer (no env) the sessions may already be gone, so only this stepper's own values are released.
static void stepper_free(napi_env env, Stepper *st) {
  if (st->released) return;
  if (env) {
    unbind(st);
    for (int p = 0; p <= st->layers; p++)
      if (st->partRefs[p]) napi_delete_reference(env, st->partRefs[p]);
  } else if (st->bound) {
    for (int p = 0; p <= st->layers; p++)
      for (int i = 0; i < st->bound[p].count; i++) ort->ReleaseValue(st->bound[p].values[i]);
  }
  st->released = 1;
  free(st->bound);
  if (st->arenas)
    for (int l = 0; l < st->layers; l++) free(st->arenas[l]);
  free(st->arenas);
  free(st->partRefs);
  free(st->parts);
  free(st->cos);
  free(st->sin);
  free(st->hidden[0]);
  free(st->hidden[1]);
  free(st->qkv);
  free(st->attnGraph);
  free(st->qkv32);
  free(st->attn32);
  free(st->ids64);
  free(st->logitsIndex);
  free(st->topIds64);
  free(st->tokenStart);
}

static void stepper_finalize(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  wait_for_steps();
  stepper_free(NULL, data);
  free(data);
}

static napi_value js_create_stepper(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc != 4) return throw_error(env, "createStepper(sessions, dims, cos, sin) takes 4 arguments");
  void *p;
  size_t dimsLen, cosLen, sinLen;
  if (!typed(env, argv[1], napi_int32_array, &p, &dimsLen) || dimsLen != 10) return throw_error(env, "dims must be an Int32Array of 10");
  const int32_t *d = p;
  Stepper *st = calloc(1, sizeof *st);
  st->magic = MAGIC_STEPPER;
  st->layers = d[0];
  st->H = d[1];
  st->nh = d[2];
  st->kvh = d[3];
  st->hd = d[4];
  st->V = d[5];
  st->totalPages = d[6];
  st->kvHalf = d[7];
  st->graphHalf = d[8];
  st->threads = d[9] > 0 ? d[9] : 1;
  st->boundB = -1;
  if (st->layers <= 0 || st->H <= 0 || st->nh <= 0 || st->kvh <= 0 || st->hd <= 0 || st->hd > 1024 || st->hd % 2 != 0 || st->nh % st->kvh != 0 || st->V <= 0 || st->totalPages <= 0) {
    free(st);
    return throw_error(env, "bad dims");
  }
  st->qkvWidth = (st->nh + 2 * st->kvh) * st->hd;
  uint32_t nparts;
  napi_get_array_length(env, argv[0], &nparts);
  if ((int)nparts != st->layers + 1) {
    free(st);
    return throw_error(env, "sessions must hold layers + 1 parts");
  }
  float *tables[2];
  for (int i = 0; i < 2; i++) {
    size_t n;
    if (!typed(env, argv[2 + i], napi_float32_array, &p, i ? &sinLen : &cosLen)) {
      free(st);
      return throw_error(env, "cos and sin must be Float32Arrays");
    }
    n = i ? sinLen : cosLen;
    tables[i] = malloc(n * sizeof(float));
    memcpy(tables[i], p, n * sizeof(float));
  }
  st->cos = tables[0];
  st->sin = tables[1];
  if (cosLen != sinLen || cosLen % (st->hd / 2) != 0) {
    free(st->cos);
    free(st->sin);
    free(st);
    return throw_error(env, "cos and sin must be [positions, head_dim / 2] tables of one size");
  }
  st->ropePositions = cosLen / (st->hd / 2);
  st->parts = calloc(nparts, sizeof *st->parts);
  st->partRefs = calloc(nparts, sizeof *st->partRefs);
  for (uint32_t i = 0; i < nparts; i++) {
    napi_value v;
    napi_get_element(env, argv[0], i, &v);
    st->parts[i] = unwrap(env, v, MAGIC_SESSION);
    if (!st->parts[i] || st->parts[i]->released || st->parts[i]->deviceInfo) {
      for (uint32_t j = 0; j < i; j++) napi_delete_reference(env, st->partRefs[j]);
      free(st->parts);
      free(st->partRefs);
      free(st->cos);
      free(st->sin);
      free(st);
      return throw_error(env, "sessions must be live CPU sessions");
    }
    napi_create_reference(env, v, 1, &st->partRefs[i]);
  }
  // Each layer's arena; calloc leaves pages untouched (and so without memory) until a sequence first uses them.
  const size_t arenaElements = (size_t)st->totalPages * 2 * st->kvh * PAGE * st->hd;
  st->arenas = calloc((size_t)st->layers, sizeof *st->arenas);
  for (int l = 0; l < st->layers; l++) {
    st->arenas[l] = calloc(arenaElements, st->kvHalf ? 2 : 4);
    if (!st->arenas[l]) {
      stepper_free(env, st);
      free(st);
      return throw_error(env, "out of memory for the KV cache");
    }
  }
  st->bound = calloc((size_t)st->layers + 1, sizeof *st->bound);
  napi_value result;
  napi_create_external(env, st, stepper_finalize, NULL, &result);
  return result;
}

static int grow(void **buf, size_t bytes) {
  void *p = realloc(*buf, bytes);
  if (!p) return 0;
  *buf = p;
  return 1;
}

static int ensure_capacity(Stepper *st, size_t rows, size_t batch) {
  const size_t es = st->graphHalf ? 2 : 4;
  if (rows > st->capRows) {
    const size_t n = rows > 2 * st->capRows ? rows : 2 * st->capRows;
    if (!grow(&st->hidden[0], n * st->H * es) || !grow(&st->hidden[1], n * st->H * es) || !grow(&st->qkv, n * st->qkvWidth * es) ||
        !grow((void **)&st->attn32, n * st->nh * st->hd * 4) || !grow((void **)&st->ids64, n * 8))
      return 0;
    if (st->graphHalf && (!grow((void **)&st->qkv32, n * st->qkvWidth * 4) || !grow(&st->attnGraph, n * st->nh * st->hd * 2))) return 0;
    st->capRows = n;
    unbind(st);
  }
  if (batch > st->capBatch) {
    const size_t n = batch > 2 * st->capBatch ? batch : 2 * st->capBatch;
    if (!grow((void **)&st->logitsIndex, n * 8) || !grow((void **)&st->topIds64, n * 1024 * 8) || !grow((void **)&st->tokenStart, n * 4)) return 0;
    st->capBatch = n;
    unbind(st);
  }
  return 1;
}

static int bind_value(Stepper *st, int part, int output, const char *name, void *data, size_t bytes, const int64_t *dims, size_t rank, int type) {
  Bound *b = &st->bound[part];
  OrtValue *v;
  if (failed(ort->CreateTensorWithDataAsOrtValue(cpuInfo, data, bytes, dims, rank, type, &v), st->error, sizeof st->error)) return 0;
  b->values[b->count++] = v;
  OrtIoBinding *binding = st->parts[part]->binding;
  return !failed(output ? ort->BindOutput(binding, name, v) : ort->BindInput(binding, name, v), st->error, sizeof st->error);
}

// Binds every part's inputs and outputs to this step's buffers (kept while the step's shape stays the same).
static int bind_all(Stepper *st) {
  const int B = st->B, N = st->N, L = st->layers;
  const size_t es = st->graphHalf ? 2 : 4;
  const int gtype = st->graphHalf ? ELEM_FLOAT16 : ELEM_FLOAT;
  if (st->boundB == B && st->boundN == N && st->boundK == st->k && st->boundFull == st->full && st->boundLogits == (void *)st->logits &&
      st->boundTop == (void *)st->topLogits && st->boundHidden == st->hidden[0])
    return 1;
  unbind(st);
  void *attn = st->graphHalf ? st->attnGraph : (void *)st->attn32;
  const int64_t idsDims[2] = {1, N}, hiddenDims[2] = {N, st->H}, qkvDims[2] = {N, st->qkvWidth}, attnDims[2] = {N, (int64_t)st->nh * st->hd};
  const int64_t batchDims[1] = {B}, oneDims[1] = {1}, logitsDims[2] = {B, st->V}, topDims[2] = {B, st->k};
  if (!bind_value(st, 0, 0, "input_ids", st->ids64, (size_t)N * 8, idsDims, 2, ELEM_INT64)) return 0;
  for (int p = 0; p <= L; p++) {
    if (p > 0) {
      if (!bind_value(st, p, 0, "hidden_in", st->hidden[(p - 1) % 2], (size_t)N * st->H * es, hiddenDims, 2, gtype)) return 0;
      if (!bind_value(st, p, 0, "attn", attn, (size_t)N * st->nh * st->hd * es, attnDims, 2, gtype)) return 0;
    }
    if (p < L) {
      if (!bind_value(st, p, 1, "hidden", st->hidden[p % 2], (size_t)N * st->H * es, hiddenDims, 2, gtype)) return 0;
      if (!bind_value(st, p, 1, "qkv", st->qkv, (size_t)N * st->qkvWidth * es, qkvDims, 2, gtype)) return 0;
    } else {
      if (!bind_value(st, p, 0, "logits_index", st->logitsIndex, (size_t)B * 8, batchDims, 1, ELEM_INT64)) return 0;
      if (!bind_value(st, p, 0, "top_k", &st->topK, 8, oneDims, 1, ELEM_INT64)) return 0;
      if (st->full) {
        if (!bind_value(st, p, 1, "logits", st->logits, (size_t)B * st->V * 4, logitsDims, 2, ELEM_FLOAT)) return 0;
      } else {
        if (!bind_value(st, p, 1, "top_logits", st->topLogits, (size_t)B * st->k * 4, topDims, 2, ELEM_FLOAT)) return 0;
        if (!bind_value(st, p, 1, "top_ids", st->topIds64, (size_t)B * st->k * 8, topDims, 2, ELEM_INT64)) return 0;
      }
    }
  }
  st->boundB = B;
  st->boundN = N;
  st->boundK = st->k;
  st->boundFull = st->full;
  st->boundLogits = st->logits;
  st->boundTop = st->topLogits;
  st->boundHidden = st->hidden[0];
  return 1;
}

static void step_run(Stepper *st) {
  st->error[0] = 0;
  const double started = now_seconds();
#ifdef _OPENMP
  omp_set_num_threads(st->threads);
#endif
  const int B = st->B, N = st->N;
  for (int i = 0; i < N; i++) st->ids64[i] = st->ids[i];
  for (int b = 0, at = 0; b < B; b++) {
    st->tokenStart[b] = at;
    at += st->rows[3 * b];
    st->logitsIndex[b] = at - 1;
  }
  st->topK = st->k;
  if (!bind_all(st)) return;
  if (failed(ort->RunWithBinding(st->parts[0]->session, NULL, st->parts[0]->binding), st->error, sizeof st->error)) return;
  Job j = {0};
  j.half = st->kvHalf;
  j.qkv = st->graphHalf ? st->qkv32 : st->qkv;
  j.cos = st->cos;
  j.sin = st->sin;
  j.out = st->attn32;
  j.rows = st->rows;
  j.pages = st->table;
  j.B = B;
  j.T = N;
  j.tokenStart = st->tokenStart;
  j.nh = st->nh;
  j.kvh = st->kvh;
  j.hd = st->hd;
  j.totalPages = st->totalPages;
  for (int l = 0; l < st->layers; l++) {
    if (st->graphHalf) kernels.h2f(st->qkv, st->qkv32, N * st->qkvWidth);
    j.arena = st->arenas[l];
    run_layer(&j);
    if (st->graphHalf) kernels.f2h(st->attn32, st->attnGraph, N * st->nh * st->hd);
    if (failed(ort->RunWithBinding(st->parts[l + 1]->session, NULL, st->parts[l + 1]->binding), st->error, sizeof st->error)) return;
  }
  if (!st->full) for (int i = 0; i < B * st->k; i++) st->topIds[i] = (int32_t)st->topIds64[i];
  st->seconds = now_seconds() - started;
}

static void step_execute(napi_env env, void *data) {
  (void)env;
  __atomic_add_fetch(&executingSteps, 1, __ATOMIC_ACQ_REL);
  step_run(data);
  __atomic_sub_fetch(&executingSteps, 1, __ATOMIC_ACQ_REL);
}

static void step_complete(napi_env env, napi_status status, void *data) {
  Stepper *st = data;
  for (int i = 0; i < 6; i++) napi_delete_reference(env, st->argRefs[i]);
  napi_delete_async_work(env, st->work);
  st->busy = 0;
  if (status != napi_ok || st->error[0]) {
    napi_value msg, err;
    napi_create_string_utf8(env, status != napi_ok ? "the step was cancelled" : st->error, NAPI_AUTO_LENGTH, &msg);
    napi_create_error(env, NULL, msg, &err);
    napi_reject_deferred(env, st->deferred, err);
    unbind(st);
  } else {
    napi_value seconds;
    napi_create_double(env, st->seconds, &seconds);
    napi_resolve_deferred(env, st->deferred, seconds);
  }
}

static napi_value stepper_run(napi_env env, napi_callback_info info, int sync) {
  size_t argc = 11;
  napi_value argv[11];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  Stepper *st = argc == 11 ? unwrap(env, argv[0], MAGIC_STEPPER) : NULL;
  if (!st || st->released) return throw_error(env, "stepperRun(stepper, B, T, k, full, ids, rows, table, logits, topLogits, topIds) takes a live stepper");
  if (st->busy) return throw_error(env, "the stepper is already running a step");
  int32_t B, N, k;
  bool full;
  napi_get_value_int32(env, argv[1], &B);
  napi_get_value_int32(env, argv[2], &N);
  napi_get_value_int32(env, argv[3], &k);
  napi_get_value_bool(env, argv[4], &full);
  void *p;
  size_t idsLen, rowsLen, tableLen, logitsLen, topLen, topIdsLen;
  if (!typed(env, argv[5], napi_int32_array, &p, &idsLen)) return throw_error(env, "ids must be an Int32Array");
  st->ids = p;
  if (!typed(env, argv[6], napi_int32_array, &p, &rowsLen)) return throw_error(env, "rows must be an Int32Array");
  st->rows = p;
  if (!typed(env, argv[7], napi_int32_array, &p, &tableLen)) return throw_error(env, "table must be an Int32Array");
  st->table = p;
  if (!typed(env, argv[8], napi_float32_array, &p, &logitsLen)) return throw_error(env, "logits must be a Float32Array");
  st->logits = p;
  if (!typed(env, argv[9], napi_float32_array, &p, &topLen)) return throw_error(env, "topLogits must be a Float32Array");
  st->topLogits = p;
  if (!typed(env, argv[10], napi_int32_array, &p, &topIdsLen)) return throw_error(env, "topIds must be an Int32Array");
  st->topIds = p;
  if (B < 1 || N < B || k < 1 || k > 1024 || k > st->V) return throw_error(env, "bad B, N or k");
  if ((size_t)N > idsLen || (size_t)B * 3 > rowsLen) return throw_error(env, "ids must hold N tokens and rows B * 3 entries");
  if (full ? (size_t)B * st->V > logitsLen : ((size_t)B * k > topLen || (size_t)B * k > topIdsLen)) return throw_error(env, "the output arrays are too short for this step");
  int64_t tokens = 0;
  for (int b = 0; b < B; b++) {
    const int n = st->rows[3 * b], len = st->rows[3 * b + 1], start = st->rows[3 * b + 2];
    if (n < 1 || len < 0 || start < 0) return throw_error(env, "bad row");
    tokens += n;
    if ((size_t)len + n > st->ropePositions) return throw_error(env, "a row's positions run past the rotary tables");
    const size_t needed = (size_t)(len + n + PAGE - 1) / PAGE;
    if ((size_t)start + needed > tableLen) return throw_error(env, "a row's page list is shorter than its positions");
    for (size_t i = 0; i < needed; i++) {
      const int32_t page = st->table[start + i];
      if (page < 0 || page >= st->totalPages) return throw_error(env, "a page lies outside the KV cache");
    }
  }
  if (tokens != N) return throw_error(env, "the rows' token counts must add up to N");
  if (!ensure_capacity(st, (size_t)N, (size_t)B)) return throw_error(env, "out of memory for a step's buffers");
  st->B = B;
  st->N = N;
  st->k = k;
  st->full = full;
  if (sync) {
    step_run(st);
    if (st->error[0]) {
      unbind(st);
      return throw_error(env, st->error);
    }
    napi_value seconds;
    napi_create_double(env, st->seconds, &seconds);
    return seconds;
  }
  for (int i = 0; i < 6; i++) napi_create_reference(env, argv[5 + i], 1, &st->argRefs[i]);
  napi_value promise, name;
  napi_create_promise(env, &st->deferred, &promise);
  napi_create_string_utf8(env, "tally.step", NAPI_AUTO_LENGTH, &name);
  napi_create_async_work(env, NULL, name, step_execute, step_complete, st, &st->work);
  st->busy = 1;
  napi_queue_async_work(env, st->work);
  return promise;
}

static napi_value js_stepper_run(napi_env env, napi_callback_info info) {
  return stepper_run(env, info, 0);
}

// The same pass on the calling thread: for passes shorter than the two thread handoffs of the pool would be.
static napi_value js_stepper_run_sync(napi_env env, napi_callback_info info) {
  return stepper_run(env, info, 1);
}

static napi_value js_release(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc != 1) return throw_error(env, "release(session | stepper | buffer)");
  Stepper *st = unwrap(env, argv[0], MAGIC_STEPPER);
  if (st) {
    if (st->busy) return throw_error(env, "the stepper is running a step");
    stepper_free(env, st);
    return NULL;
  }
  Buffer *b = unwrap(env, argv[0], MAGIC_BUFFER);
  if (b) {
    if (b->owner && b->owner->busy) return throw_error(env, "a run that may use the buffer is in flight");
    buffer_free(env, b);
    return NULL;
  }
  Session *s = unwrap(env, argv[0], MAGIC_SESSION);
  if (!s) return throw_error(env, "release(session | stepper | buffer)");
  if (s->busy) return throw_error(env, "the session is running");
  if (s->buffers > 0) return throw_error(env, "release the session's buffers first: they came from its allocator");
  session_free(s);
  return NULL;
}

// stepperCopyPage(stepper, from, to): page `to` takes page `from`'s keys and values in every layer (the prefix
// cache's private copy of a shared last page). Laid out as attention.c lays out an arena: per layer, one block of
// totalPages pages per kind (K, V) and KV head.
static napi_value js_stepper_copy_page(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  Stepper *st = argc == 3 ? unwrap(env, argv[0], MAGIC_STEPPER) : NULL;
  if (!st || st->released) return throw_error(env, "stepperCopyPage(stepper, from, to) takes a live stepper");
  if (st->busy) return throw_error(env, "the stepper is running a step");
  int32_t from, to;
  napi_get_value_int32(env, argv[1], &from);
  napi_get_value_int32(env, argv[2], &to);
  if (from < 0 || to < 0 || from >= st->totalPages || to >= st->totalPages) return throw_error(env, "a page lies outside the KV cache");
  const size_t es = st->kvHalf ? 2 : 4;
  const size_t span = (size_t)PAGE * st->hd * es;
  for (int l = 0; l < st->layers; l++) {
    char *arena = st->arenas[l];
    for (int block = 0; block < 2 * st->kvh; block++) {
      char *base = arena + (size_t)block * st->totalPages * span;
      memmove(base + (size_t)to * span, base + (size_t)from * span, span);
    }
  }
  return NULL;
}

static napi_value js_claim_pool(napi_env env, napi_callback_info info) {
  (void)info;
  pthread_mutex_lock(&loadLock);
  const int claimed = poolThreads > 0 && !poolClaimed && poolSessions == 0;
  if (claimed) poolClaimed = 1;
  pthread_mutex_unlock(&loadLock);
  napi_value result;
  napi_get_boolean(env, claimed, &result);
  return result;
}

static void export_fn(napi_env env, napi_value exports, const char *name, napi_callback cb) {
  napi_value fn;
  napi_create_function(env, name, NAPI_AUTO_LENGTH, cb, NULL, &fn);
  napi_set_named_property(env, exports, name, fn);
}

NAPI_MODULE_INIT() {
  choose_kernels();
  export_fn(env, exports, "load", js_load);
  export_fn(env, exports, "claimPool", js_claim_pool);
  export_fn(env, exports, "createSession", js_create_session);
  export_fn(env, exports, "sessionNames", js_session_names);
  export_fn(env, exports, "sessionRun", js_session_run);
  export_fn(env, exports, "sessionRunAsync", js_session_run_async);
  export_fn(env, exports, "allocate", js_allocate);
  export_fn(env, exports, "createStepper", js_create_stepper);
  export_fn(env, exports, "stepperRun", js_stepper_run);
  export_fn(env, exports, "stepperRunSync", js_stepper_run_sync);
  export_fn(env, exports, "stepperCopyPage", js_stepper_copy_page);
  export_fn(env, exports, "release", js_release);
  napi_value v;
  napi_create_int32(env, PAGE, &v);
  napi_set_named_property(env, exports, "pagePositions", v);
  napi_create_int32(env, TALLY_ORT_API_VERSION, &v);
  napi_set_named_property(env, exports, "apiVersion", v);
  napi_set_named_property(env, exports, "kernels", str(env, kernel_name));
  return exports;
}
