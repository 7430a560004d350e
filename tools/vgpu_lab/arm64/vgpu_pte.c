// SPDX-License-Identifier: GPL-2.0
/*
 * vgpu_pte: the page-table entry and memory type an arm64 kernel installed for one address of the calling process.
 *
 * Why a module: arm64's ptdump walks only the kernel's tables, and /proc/PID/pagemap gives frame numbers, not
 * attributes; the memory type of a user mapping (what map_info turned into) exists only in the process's own
 * page table, indexed through MAIR_EL1.  A test program writes an address (hex) to /sys/kernel/debug/vgpu_pte and
 * reads back one line:
 *
 *   va=0x... level=3 entry=0x... attrindx=2 mair=0x44 type=Normal-NC
 *
 * or "va=0x... error=..." when nothing maps it.  The walk holds the mmap lock, so the tables cannot go away.
 */
#include <linux/debugfs.h>
#include <linux/fs.h>
#include <linux/kernel.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/pgtable.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <asm/sysreg.h>

#define LINE_MAX_LEN 200

struct answer {
	size_t len;
	char text[LINE_MAX_LEN];
};

/* MAIR_EL1 attribute bytes, as the Arm ARM encodes them (D19.2 MAIR_EL1). */
static const char *memory_type(u8 attr)
{
	switch (attr) {
	case 0x00: return "Device-nGnRnE";
	case 0x04: return "Device-nGnRE";
	case 0x08: return "Device-nGRE";
	case 0x0c: return "Device-GRE";
	case 0x44: return "Normal-NC";
	case 0xbb: return "Normal-WT";
	case 0xf0: return "Normal-WB-Tagged";
	case 0xff: return "Normal-WB";
	default: return "other";
	}
}

/* The leaf entry for addr and its level (1 PUD block, 2 PMD block, 3 page), or -ENOENT. */
static int leaf_entry(struct mm_struct *mm, unsigned long addr, u64 *entry, int *level)
{
	pgd_t *pgd = pgd_offset(mm, addr);
	p4d_t *p4d;
	pud_t *pud;
	pmd_t *pmd;
	pte_t *pte, val;

	if (pgd_none(READ_ONCE(*pgd)) || pgd_bad(READ_ONCE(*pgd)))
		return -ENOENT;
	p4d = p4d_offset(pgd, addr);
	if (p4d_none(READ_ONCE(*p4d)) || p4d_bad(READ_ONCE(*p4d)))
		return -ENOENT;
	pud = pud_offset(p4d, addr);
	if (pud_none(READ_ONCE(*pud)))
		return -ENOENT;
	if (pud_leaf(READ_ONCE(*pud))) {
		*entry = pud_val(READ_ONCE(*pud));
		*level = 1;
		return 0;
	}
	pmd = pmd_offset(pud, addr);
	if (pmd_none(READ_ONCE(*pmd)))
		return -ENOENT;
	if (pmd_leaf(READ_ONCE(*pmd))) {
		*entry = pmd_val(READ_ONCE(*pmd));
		*level = 2;
		return 0;
	}
	pte = pte_offset_kernel(pmd, addr);
	val = READ_ONCE(*pte);
	if (!pte_present(val))
		return -ENOENT;
	*entry = pte_val(val);
	*level = 3;
	return 0;
}

static ssize_t query_write(struct file *file, const char __user *buf, size_t count, loff_t *ppos)
{
	struct answer *a = file->private_data;
	struct mm_struct *mm = current->mm;
	unsigned long addr;
	u64 entry = 0, mair = read_sysreg(mair_el1);
	int level = 0, err;
	unsigned int idx;

	err = kstrtoul_from_user(buf, count, 16, &addr);
	if (err)
		return err;
	if (!mm)
		return -EINVAL;
	mmap_read_lock(mm);
	err = leaf_entry(mm, addr, &entry, &level);
	mmap_read_unlock(mm);
	if (err) {
		a->len = scnprintf(a->text, sizeof(a->text), "va=0x%lx error=not-mapped\n", addr);
		return count;
	}
	idx = (entry >> 2) & 7; /* AttrIndx[2:0], bits 4:2 of a stage-1 block or page descriptor */
	a->len = scnprintf(a->text, sizeof(a->text),
			   "va=0x%lx level=%d entry=0x%llx attrindx=%u mair=0x%02x type=%s\n", addr, level,
			   (unsigned long long)entry, idx, (unsigned int)((mair >> (8 * idx)) & 0xff),
			   memory_type((mair >> (8 * idx)) & 0xff));
	return count;
}

static ssize_t query_read(struct file *file, char __user *buf, size_t count, loff_t *ppos)
{
	struct answer *a = file->private_data;

	return simple_read_from_buffer(buf, count, ppos, a->text, a->len);
}

static int query_open(struct inode *inode, struct file *file)
{
	file->private_data = kzalloc(sizeof(struct answer), GFP_KERNEL);
	return file->private_data ? 0 : -ENOMEM;
}

static int query_release(struct inode *inode, struct file *file)
{
	kfree(file->private_data);
	return 0;
}

static const struct file_operations query_fops = {
	.owner = THIS_MODULE,
	.open = query_open,
	.release = query_release,
	.read = query_read,
	.write = query_write,
	.llseek = default_llseek,
};

static struct dentry *pte_file;

static int __init vgpu_pte_init(void)
{
	pte_file = debugfs_create_file("vgpu_pte", 0600, NULL, NULL, &query_fops);
	return IS_ERR(pte_file) ? PTR_ERR(pte_file) : 0;
}

static void __exit vgpu_pte_exit(void)
{
	debugfs_remove(pte_file);
}

module_init(vgpu_pte_init);
module_exit(vgpu_pte_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("vgpu lab: the memory type of a user mapping, from the process's own page table");
