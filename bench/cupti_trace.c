// A non-blocking GPU timeline of any CUDA program, through CUPTI's activity API: every kernel
// (GPU start/end), memcpy and driver-API call (host start/end, thread) goes to a TSV file
// that bench/timeline.py reads. CubeCL's own profiler blocks on every launch, which hides whether
// the GPU waits for the host; this does not (records are buffered and written off the hot path).
//
// Loaded by the CUDA driver itself: CUDA_INJECTION64_PATH=/path/libcupti_trace.so calls
// InitializeInjection at cuInit. bench/gpu_trace.sh builds it on the GPU machine, where the
// CUPTI headers match the library; KERNEL_T and MEMCPY_T name that version's newest records.
//
//   KILN_TRACE=/tmp/kiln.tsv CUDA_INJECTION64_PATH=$PWD/libcupti_trace.so kiln bench train ...
#include <cupti.h>
#include <stdio.h>
#include <stdlib.h>

#ifndef KERNEL_T
#error "define KERNEL_T (the newest CUpti_ActivityKernelN in this CUPTI's headers)"
#endif
#ifndef MEMCPY_T
#error "define MEMCPY_T (the newest CUpti_ActivityMemcpyN in this CUPTI's headers)"
#endif

#define BUFFER_BYTES (16u << 20)

static FILE *out;

static void CUPTIAPI give_buffer(uint8_t **buffer, size_t *size, size_t *max_records) {
    *buffer = aligned_alloc(8, BUFFER_BYTES);
    *size = *buffer ? BUFFER_BYTES : 0;
    *max_records = 0;
}

// Rows: K start end correlation stream name | C start end correlation bytes kind |
//       A start end correlation thread call | D dropped. Times are CUPTI's ns clock,
// the same clock for host (A) and GPU (K, C) rows.
static void CUPTIAPI take_buffer(CUcontext ctx, uint32_t stream, uint8_t *buffer, size_t size, size_t valid) {
    (void)size;
    CUpti_Activity *r = NULL;
    while (cuptiActivityGetNextRecord(buffer, valid, &r) == CUPTI_SUCCESS) {
        switch (r->kind) {
        case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL:
        case CUPTI_ACTIVITY_KIND_KERNEL: {
            KERNEL_T *k = (KERNEL_T *)r;
            fprintf(out, "K\t%llu\t%llu\t%u\t%u\t%s\n", (unsigned long long)k->start, (unsigned long long)k->end,
                    k->correlationId, k->streamId, k->name ? k->name : "?");
            break;
        }
        case CUPTI_ACTIVITY_KIND_MEMCPY: {
            MEMCPY_T *m = (MEMCPY_T *)r;
            fprintf(out, "C\t%llu\t%llu\t%u\t%llu\t%u\n", (unsigned long long)m->start, (unsigned long long)m->end,
                    m->correlationId, (unsigned long long)m->bytes, (unsigned)m->copyKind);
            break;
        }
        case CUPTI_ACTIVITY_KIND_DRIVER: {
            CUpti_ActivityAPI *a = (CUpti_ActivityAPI *)r;
            const char *call = NULL;
            cuptiGetCallbackName(CUPTI_CB_DOMAIN_DRIVER_API, a->cbid, &call);
            fprintf(out, "A\t%llu\t%llu\t%u\t%u\t%s\n", (unsigned long long)a->start, (unsigned long long)a->end,
                    a->correlationId, a->threadId, call ? call : "?");
            break;
        }
        default:
            break;
        }
    }
    size_t dropped = 0;
    cuptiActivityGetNumDroppedRecords(ctx, stream, &dropped);
    if (dropped) fprintf(out, "D\t%zu\n", dropped);
    free(buffer);
}

static void flush_at_exit(void) {
    cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
    if (out) fclose(out);
}

static int check(CUptiResult r, const char *what) {
    if (r == CUPTI_SUCCESS) return 1;
    const char *why = NULL;
    cuptiGetResultString(r, &why);
    fprintf(stderr, "cupti_trace: %s failed: %s\n", what, why ? why : "?");
    return 0;
}

int InitializeInjection(void) {
    const char *path = getenv("KILN_TRACE");
    out = fopen(path ? path : "cupti-trace.tsv", "w");
    if (!out) {
        perror("cupti_trace: cannot open KILN_TRACE");
        return 0;
    }
    if (!check(cuptiActivityRegisterCallbacks(give_buffer, take_buffer), "registering buffers")) return 0;
    if (!check(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL), "kernel records")) return 0;
    check(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY), "memcpy records");
    check(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_DRIVER), "driver-call records");
    // Buffers also go out twice a second, so a run cut off by its time limit still leaves most of
    // its timeline.
    cuptiActivityFlushPeriod(500);
    atexit(flush_at_exit);
    return 1;
}
