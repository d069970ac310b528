/*
 * A thin C shim over DPDK's rte_acl for portcullis-bench: EAL start-up for a VM without hugepages,
 * building an IPv4 5-tuple context from ClassBench-style rules (first match wins), and batch
 * classification with a chosen algorithm. Rust calls only these functions (see src/dpdk.rs).
 */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <rte_acl.h>
#include <rte_eal.h>
#include <rte_errno.h>
#include <rte_malloc.h>

/* The classified data: DPDK reads it in network byte order. */
struct pc_ipv4_5tuple {
    uint8_t proto;
    uint32_t src;
    uint32_t dst;
    uint16_t sport;
    uint16_t dport;
} __attribute__((packed));

/* One rule as Rust passes it (host byte order). */
struct pc_rule {
    uint32_t src, src_len, dst, dst_len;
    uint16_t sport_lo, sport_hi, dport_lo, dport_hi;
    uint8_t proto, proto_mask;
};

enum { F_PROTO, F_SRC, F_DST, F_SPORT, F_DPORT, NUM_FIELDS };

RTE_ACL_RULE_DEF(pc_acl_rule, NUM_FIELDS);

static struct rte_acl_field_def field_defs[NUM_FIELDS] = {
    {.type = RTE_ACL_FIELD_TYPE_BITMASK, .size = sizeof(uint8_t), .field_index = F_PROTO, .input_index = 0,
     .offset = offsetof(struct pc_ipv4_5tuple, proto)},
    {.type = RTE_ACL_FIELD_TYPE_MASK, .size = sizeof(uint32_t), .field_index = F_SRC, .input_index = 1,
     .offset = offsetof(struct pc_ipv4_5tuple, src)},
    {.type = RTE_ACL_FIELD_TYPE_MASK, .size = sizeof(uint32_t), .field_index = F_DST, .input_index = 2,
     .offset = offsetof(struct pc_ipv4_5tuple, dst)},
    {.type = RTE_ACL_FIELD_TYPE_RANGE, .size = sizeof(uint16_t), .field_index = F_SPORT, .input_index = 3,
     .offset = offsetof(struct pc_ipv4_5tuple, sport)},
    {.type = RTE_ACL_FIELD_TYPE_RANGE, .size = sizeof(uint16_t), .field_index = F_DPORT, .input_index = 3,
     .offset = offsetof(struct pc_ipv4_5tuple, dport)},
};

/* Starts the EAL; returns 0 or a negative errno, with a message in err. */
int pc_eal_init(int argc, char **argv, char *err, size_t errlen)
{
    int r = rte_eal_init(argc, argv);
    if (r < 0) {
        snprintf(err, errlen, "rte_eal_init failed: %s", rte_strerror(rte_errno));
        return -rte_errno;
    }
    return 0;
}

static size_t heap_used(void)
{
    struct rte_malloc_socket_stats s;
    size_t total = 0;
    for (int sock = 0; sock < RTE_MAX_NUMA_NODES; sock++)
        if (rte_malloc_get_socket_stats(sock, &s) == 0)
            total += s.heap_allocsz_bytes;
    return total;
}

/* Builds a context; priority follows the rule order so the first match wins. Returns NULL with a
 * message in err on failure; *mem receives the heap bytes the context took. */
void *pc_acl_build(const char *name, const struct pc_rule *rules, uint32_t n, size_t *mem, char *err, size_t errlen)
{
    struct rte_acl_param prm = {
        .name = name,
        .socket_id = SOCKET_ID_ANY,
        .rule_size = RTE_ACL_RULE_SZ(NUM_FIELDS),
        .max_rule_num = n,
    };
    size_t before = heap_used();
    struct rte_acl_ctx *ctx = rte_acl_create(&prm);
    if (ctx == NULL) {
        snprintf(err, errlen, "rte_acl_create failed: %s", rte_strerror(rte_errno));
        return NULL;
    }
    for (uint32_t i = 0; i < n; i++) {
        struct pc_acl_rule r;
        memset(&r, 0, sizeof(r));
        r.data.category_mask = 1;
        r.data.priority = (int32_t)(RTE_ACL_MAX_PRIORITY - i); /* earlier rule = higher priority */
        r.data.userdata = i + 1;                               /* 0 means no match */
        r.field[F_PROTO].value.u8 = rules[i].proto;
        r.field[F_PROTO].mask_range.u8 = rules[i].proto_mask;
        r.field[F_SRC].value.u32 = rules[i].src;
        r.field[F_SRC].mask_range.u32 = rules[i].src_len;
        r.field[F_DST].value.u32 = rules[i].dst;
        r.field[F_DST].mask_range.u32 = rules[i].dst_len;
        r.field[F_SPORT].value.u16 = rules[i].sport_lo;
        r.field[F_SPORT].mask_range.u16 = rules[i].sport_hi;
        r.field[F_DPORT].value.u16 = rules[i].dport_lo;
        r.field[F_DPORT].mask_range.u16 = rules[i].dport_hi;
        int e = rte_acl_add_rules(ctx, (const struct rte_acl_rule *)&r, 1);
        if (e != 0) {
            snprintf(err, errlen, "rte_acl_add_rules failed at rule %u: %s", i, strerror(-e));
            rte_acl_free(ctx);
            return NULL;
        }
    }
    struct rte_acl_config cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.num_categories = 1;
    cfg.num_fields = NUM_FIELDS;
    memcpy(cfg.defs, field_defs, sizeof(field_defs));
    int e = rte_acl_build(ctx, &cfg);
    if (e != 0) {
        snprintf(err, errlen, "rte_acl_build failed: %s", strerror(-e));
        rte_acl_free(ctx);
        return NULL;
    }
    *mem = heap_used() - before;
    return ctx;
}

/* Selects the classify method: 0 default, then the rte_acl_classify_alg values. Returns 0 or a
 * negative errno (-ENOTSUP where this CPU or build lacks it). */
int pc_acl_set_alg(void *ctx, int alg)
{
    if (alg == 0)
        return 0;
    return rte_acl_set_ctx_classify((struct rte_acl_ctx *)ctx, (enum rte_acl_classify_alg)alg);
}

/* Classifies num packed 5-tuples (network byte order) through rte_acl's batch API. */
int pc_acl_classify(void *ctx, const struct pc_ipv4_5tuple *keys, uint32_t *results, uint32_t num)
{
    const uint8_t *ptrs[256];
    int r = 0;
    for (uint32_t done = 0; done < num && r == 0; done += 256) {
        uint32_t k = num - done < 256 ? num - done : 256;
        for (uint32_t i = 0; i < k; i++)
            ptrs[i] = (const uint8_t *)&keys[done + i];
        r = rte_acl_classify((struct rte_acl_ctx *)ctx, ptrs, results + done, k, 1);
    }
    return r;
}

void pc_acl_free(void *ctx)
{
    rte_acl_free((struct rte_acl_ctx *)ctx);
}
